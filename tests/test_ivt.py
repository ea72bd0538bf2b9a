"""IVT as its authors built it (#14): the shared tower against a plain-torch reference of the official architecture
written here from model/backbones/vit_vl.py (``UVT_Bert_IMG_TXT_MASK`` with BertEmbeddings, ``AttentionMask``,
``BlockVisTxt``), official checkpoints (fine-tuned and vision-language pretrained) in their key layout, BMM as the
official forward samples it. Every checkpoint is tiny, random and made by the test; nothing is downloaded."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tbps.config import ConfigError, load_config
from tbps.data import load_tokenizer
from tbps.methods import TextSpec, create_method
from tbps.models import WeightLoadError
from tbps.models.shared import bmm_keep

WIDTH, LAYERS, HEADS, PATCH, STRIDE, SIZE, POSITIONS = 32, 2, 2, 8, 6, (48, 16), 40


# --------------------------------------------------------------------- reference: the official IVT architecture
class RefAttention(nn.Module):
    """``AttentionMask``: one qkv Linear, scaled dot product, additive (1 - mask) * -10000."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.scale = heads, (d // heads) ** -0.5
        self.qkv = nn.Linear(d, 3 * d, bias=True)
        self.proj = nn.Linear(d, d)

    def forward(self, x, mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if mask is not None:
            attn = attn + (1.0 - mask[:, None, None, :].float()) * -10000.0
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C))


class RefMlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    """``BlockVisTxt``: shared attention and norms, one FFN per modality."""

    def __init__(self, d, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn = RefAttention(d, heads)
        self.mlp_vis, self.mlp_txt = RefMlp(d), RefMlp(d)

    def forward(self, x, mask, mode):
        x = x + self.attn(self.norm1(x), mask)
        return x + (self.mlp_vis if mode == "vis" else self.mlp_txt)(self.norm2(x))


class RefEmbeddings(nn.Module):
    def __init__(self, vocab, d, positions):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, d, padding_idx=0)
        self.position_embeddings = nn.Embedding(positions, d)
        self.token_type_embeddings = nn.Embedding(2, d)
        self.LayerNorm = nn.LayerNorm(d, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(positions).expand((1, -1)))

    def forward(self, ids):
        pos = self.position_ids[:, :ids.shape[1]]
        x = self.word_embeddings(ids) + self.token_type_embeddings(torch.zeros_like(ids))
        return self.LayerNorm(x + self.position_embeddings(pos))


class RefPatchEmbed(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Conv2d(3, d, PATCH, STRIDE)


class RefUVT(nn.Module):
    """``UVT_Bert_IMG_TXT_MASK`` (as ``encoder_vl``). ``keep`` = the official BMM's ``[0] + select``: position 0 first,
    then the kept positions in the shuffled order the official forward concatenates them in."""

    def __init__(self, vocab, stride=STRIDE):
        super().__init__()
        grid = ((SIZE[0] - PATCH) // stride + 1) * ((SIZE[1] - PATCH) // stride + 1)
        self.embeddings = RefEmbeddings(vocab, WIDTH, POSITIONS)
        self.patch_embed = RefPatchEmbed(WIDTH)
        self.patch_embed.proj = nn.Conv2d(3, WIDTH, PATCH, stride)
        self.cls_token = nn.Parameter(torch.randn(1, 1, WIDTH) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, grid + 1, WIDTH) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(1, grid + 1, WIDTH) * 0.02)
        self.blocks = nn.ModuleList(RefBlock(WIDTH, HEADS) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(WIDTH, eps=1e-6)
        with torch.no_grad():  # LayerNorms away from 1/0 so a mapping mistake cannot hide
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.normal_(1.0, 0.1)
                    m.bias.normal_(0.0, 0.1)

    def forward(self, x, mask=None, mode="vis", keep=None):
        if mode == "txt":
            x = self.embeddings(x)
        else:
            x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed + self.type_embed
        if keep is not None:
            mask = torch.ones(x.shape[:2], dtype=torch.long) if mask is None else mask
            x, mask = x[:, keep], mask[:, keep]
        for blk in self.blocks:
            x = blk(x, mask, mode)
        return self.norm(x)[:, 0]


def official_checkpoint(ref, path, extra=None):
    """As the official training saves it: DDP's ``module.`` prefix, {'state_dict', 'optimizer', 'epoch', 'best_acc'},
    the legacy (non-zip) serialisation."""
    sd = {f"module.encoder_vl.{k}": v.clone() for k, v in ref.state_dict().items()}
    sd.update(extra if extra is not None else {
        "module.temp": torch.tensor(0.5), "module.classifier_img.weight": torch.randn(7, WIDTH),
        "module.bottleneck_img.weight": torch.ones(WIDTH), "module.bottleneck_img.bias": torch.zeros(WIDTH),
        "module.bottleneck_img.running_mean": torch.zeros(WIDTH), "module.bottleneck_img.running_var": torch.ones(WIDTH),
        "module.bottleneck_img.num_batches_tracked": torch.tensor(0)})
    torch.save({"state_dict": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.005, "params": [0]}]},
                "epoch": 12, "best_acc": 0.61}, path, _use_new_zipfile_serialization=False)
    return str(path)


def _overrides(synth_tiny, *more):
    return [f"data.url={synth_tiny}", f"data.image_size=[{SIZE[0]}, {SIZE[1]}]", "data.text_length=24",
            f"model.shared_heads={HEADS}", *more]


def _method(synth_tiny, pretrained, *more, log=None):
    cfg = load_config("ivt_tiny", _overrides(synth_tiny, f"model.pretrained={pretrained}", *more))
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    method = create_method(cfg, TextSpec.from_tokenizer(tok, cfg.data.text_length), 10, log=log)
    return method, cfg, tok


def _texts(tok, length=None):
    captions = ["a woman in a red coat and black boots", "a man wearing white sneakers and a blue shirt",
                "the person has long hair"]
    enc = tok(captions, padding="max_length" if length else "longest", truncation=True, max_length=length or 24,
              return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def vocab(synth_tiny):
    return len(load_tokenizer(os.path.join(synth_tiny, "tokenizer")))


@pytest.fixture(scope="module")
def ref(vocab):
    torch.manual_seed(0)
    return RefUVT(vocab).eval()


# ------------------------------------------------------------------------------------------------------ tests
def test_official_finetuned_checkpoint_equals_the_official_architecture(ref, synth_tiny, tmp_path):
    lines = []
    path = official_checkpoint(ref, tmp_path / "checkpoint_best.pth")
    # the preset's stride (8) is not the checkpoint's: it is read from the position table
    method, cfg, tok = _method(synth_tiny, path, log=lines.append)
    assert cfg.model.patch_stride == STRIDE and cfg.model.shared_width == WIDTH and cfg.model.shared_layers == LAYERS
    assert "IVT finetuned checkpoint" in lines[0] and "bottleneck_img, classifier_img, temp" in lines[0]
    method.eval()
    torch.manual_seed(1)
    images = torch.randn(2, 3, *SIZE)
    ids, mask = _texts(tok, length=24)  # padded past the longest caption: the padding changes nothing
    with torch.no_grad():
        assert torch.allclose(method.encode_image(images), ref(images, mode="vis"), atol=1e-5)
        assert torch.allclose(method.encode_text(ids, mask), ref(ids, mask, mode="txt"), atol=1e-5)


def test_bmm_equals_the_official_forward_in_training(ref, synth_tiny, tmp_path):
    """Same drawn positions -> same CLS features as the official forward, whose kept tokens come in shuffled order;
    one set of positions for the whole batch; pads count as positions (the batch is cut to its longest caption)."""
    method, cfg, tok = _method(synth_tiny, official_checkpoint(ref, tmp_path / "c.pth"))
    tower = method.tower.train()  # drop_path / dropout are 0 in this config: training differs only by BMM
    assert cfg.model.drop_path == 0 and cfg.model.text_dropout == 0
    torch.manual_seed(2)
    images = torch.randn(3, 3, *SIZE)
    ids, mask = _texts(tok)  # padded to the longest, as the official tokenizer call
    for modality in ("vis", "txt"):
        n = 1 + tower.grid[0] * tower.grid[1] if modality == "vis" else ids.shape[1]
        for seed in range(5):
            kept = bmm_keep(n, 0.2, torch.Generator().manual_seed(seed))
            body = kept[1:].tolist()
            random.Random(seed).shuffle(body)
            official_keep = torch.tensor([0] + body)
            with torch.no_grad():
                g = torch.Generator().manual_seed(seed)
                ours = tower.forward_image(images, 0.2, g) if modality == "vis" else \
                    tower.forward_text(ids, mask, 0.2, g)
                theirs = ref(images, mode="vis", keep=official_keep) if modality == "vis" else \
                    ref(ids, mask, mode="txt", keep=official_keep)
            assert torch.allclose(ours, theirs, atol=1e-5), (modality, seed)


def test_ivt_forward_uses_bmm_only_in_training(ref, synth_tiny, tmp_path):
    method, cfg, tok = _method(synth_tiny, official_checkpoint(ref, tmp_path / "c.pth"))
    ids, mask = _texts(tok, length=24)
    images = torch.randn(3, 3, *SIZE)
    method.eval()
    with torch.no_grad():
        a = method.encode_text(ids, mask), method.encode_image(images)
        b = method.encode_text(ids, mask), method.encode_image(images)
        batch = {"images": torch.stack([images] * 3, 1), "mla_ids": torch.stack([ids] * 3, 1),
                 "mla_mask": torch.stack([mask] * 3, 1), "pids": torch.tensor([0, 0, 1]),
                 "train_ids": torch.tensor([0, 0, 1])}
        eval_losses = {method(batch)["loss"].item() for _ in range(3)}
        method.train()
        train_losses = {method(batch)["loss"].item() for _ in range(8)}
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert len(eval_losses) == 1 and len(train_losses) > 1


def test_pretraining_checkpoint_grid_kept_as_official_or_resized(vocab, synth_tiny, tmp_path, capsys):
    """IVT's vision-language pretrained model (fusion encoder + ITM head beside encoder_vl) at stride 8 fine-tuned at
    stride 6: by default its position/type tables are skipped as the official copy_ does (the ImageNet ViT's position
    table stays); model.pretrained_grid=resize resizes them bilinearly."""
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(5)
    pre = RefUVT(vocab, stride=PATCH)
    extra = {"module.encoder_fusion.bert.encoder.layer.0.output.dense.weight": torch.randn(4, 4),
             "module.itm.weight": torch.randn(2, WIDTH), "module.itm.bias": torch.zeros(2), "module.temp": torch.ones(())}
    path = official_checkpoint(pre, tmp_path / "checkpoint_best.pth", extra)
    vit = VisionTransformer(img_size=32, patch_size=PATCH, embed_dim=WIDTH, depth=LAYERS, num_heads=HEADS)
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))

    method, cfg, _ = _method(synth_tiny, path, f"model.patch_stride={STRIDE}",
                             f"model.image_pretrained={tmp_path / 'vit.safetensors'}")
    assert "skipped, as the official code does" in capsys.readouterr().out
    tower = method.tower
    assert tower.grid == (7, 2)
    assert torch.equal(tower.blocks[1].attn.qkv.weight, pre.blocks[1].attn.qkv.weight)  # IVT's, over ImageNet's
    assert torch.equal(tower.blocks[0].mlp.text.fc2.weight, pre.blocks[0].mlp_txt.fc2.weight)
    vit_pos = resample_abs_pos_embed(vit.pos_embed, new_size=[7, 2], old_size=[4, 4], num_prefix_tokens=1,
                                     interpolation="bilinear", antialias=False)
    assert torch.allclose(tower.pos_embed, vit_pos)  # the ImageNet table, as the official fine-tuning keeps it

    method, _, _ = _method(synth_tiny, path, f"model.patch_stride={STRIDE}", "model.pretrained_grid=resize")
    for key in ("pos_embed", "type_embed"):
        table = getattr(pre, key)
        grid = F.interpolate(table[:, 1:].reshape(1, 6, 2, WIDTH).permute(0, 3, 1, 2), size=(7, 2), mode="bilinear")
        expected = torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 14, WIDTH)], dim=1)
        assert torch.allclose(getattr(method.tower, key), expected, atol=1e-6), key


def test_bad_ivt_checkpoints_are_clear_errors(ref, vocab, synth_tiny, tmp_path):
    path = official_checkpoint(ref, tmp_path / "odd.pth", {"module.encoder_vl.extra_head.weight": torch.ones(2)})
    with pytest.raises(WeightLoadError, match="encoder_vl.extra_head.weight"):
        _method(synth_tiny, path)
    sd = {f"encoder_vl.{k}": v for k, v in ref.state_dict().items() if k != "blocks.1.attn.qkv.weight"}
    torch.save({"state_dict": sd}, tmp_path / "partial.pth")
    with pytest.raises(WeightLoadError, match=r"missing keys.*blocks\.1\.attn\.qkv\.weight"):
        _method(synth_tiny, str(tmp_path / "partial.pth"))
    torch.manual_seed(0)
    other = RefUVT(vocab + 5)
    with pytest.raises(ConfigError, match="vocabulary of .* tokens"):
        _method(synth_tiny, official_checkpoint(other, tmp_path / "vocab.pth"))
    cfg = load_config("irra_tiny", [f"data.url={synth_tiny}", f"model.pretrained={tmp_path / 'vocab.pth'}"])
    with pytest.raises(ConfigError, match="needs method.name=ivt"):
        create_method(cfg, TextSpec(vocab + 5, 24, 0, 1, 2, 3), 10, log=None)


def test_official_ivt_model_evaluates_directly(ref, synth_tiny, tmp_path, capsys):
    """`tbps.evaluate --checkpoint <official IVT .pth>` (detected) evaluates it; the exported embeddings are the
    reference's."""
    from tbps.data import build_eval_loader
    from tbps.evaluate import main

    path = official_checkpoint(ref, tmp_path / "checkpoint_best.pth")
    out = tmp_path / "eval"
    assert main(["--checkpoint", path, "--data", synth_tiny, "--out", str(out), "--save-embeddings",
                 "--batch-size", "16", "--ap", "trapezoid", *_overrides(synth_tiny)]) == 0
    (row,) = json.loads((out / "metrics.json").read_text()).values()
    assert row["method"] == "ivt" and row["queries"] > 0 and 0 <= row["R1"] <= 100
    assert row["R1_mAP"] == pytest.approx((row["R1"] + row["mAP"]) / 2)  # IVT's selection criterion
    assert load_config("ivt").train.select_metric == "R1_mAP"  # the ivt preset selects by it, as IVT's loop
    assert 0 <= row["ivt"]["mAP"] <= 100 and row["ivt"]["gallery"] == (row["queries"] + 1) // 2
    assert "(IVT protocol)" in (out / "metrics.md").read_text()
    # on ICFG-PEDES (the manifest's name), IVT's R1_mAP_ICFG takes every caption row's image
    from conftest import renamed_dataset

    icfg = renamed_dataset(synth_tiny, tmp_path / "icfg", "icfg-pedes")
    assert main(["--checkpoint", path, "--data", icfg, "--out", str(tmp_path / "icfg-eval"), "--batch-size",
                 "16", "--ap", "trapezoid", *_overrides(icfg)]) == 0
    (icfg_row,) = json.loads((tmp_path / "icfg-eval" / "metrics.json").read_text()).values()
    assert icfg_row["ivt"]["gallery"] == icfg_row["queries"] == row["queries"]
    # shards built without IVT's caption rule (shards.build --caption-rule ivt) are named, as in pre-flight
    err = capsys.readouterr().err
    assert f"warning: {icfg} (icfg-pedes) keeps every caption as written" in err and "--caption-rule ivt" in err
    emb = np.load(out / "embeddings.npz")
    cfg = load_config("ivt", _overrides(synth_tiny))  # what --checkpoint builds an official model from
    assert cfg.data.mean == [0.5, 0.5, 0.5]
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    batch = next(iter(build_eval_loader(cfg.data, tok, "test", 4)))
    with torch.no_grad():
        img = F.normalize(ref(batch["images"], mode="vis"), dim=-1)
        txt = F.normalize(ref(batch["text_ids"], batch["text_mask"], mode="txt"), dim=-1)
    paths, captions = list(emb["image_path"]), list(emb["caption"])
    for i, p in enumerate(batch["image_path"]):
        assert np.allclose(emb["image_emb"][paths.index(p)], img[i].numpy(), atol=1e-5)
    for j, c in enumerate(batch["captions"]):
        assert np.allclose(emb["text_emb"][captions.index(c)], txt[j].numpy(), atol=1e-5)


def test_ivt_preset_keeps_long_captions_whole_as_the_official_tokenizer_call(synth_tiny):
    """IVT's processor tokenizes with ``padding='longest', max_length=100`` and no ``truncation``: transformers then
    does not truncate (max_length alone truncates only without padding), so a caption over 100 word pieces is kept
    whole. The preset's data.text_length (512, BERT's positions) keeps it too: the loader's ids, cut to the batch's
    longest caption as IVT's forward cuts them, are the official call's."""
    from tbps.data.text import tokenize, trim_padding

    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    captions = [" ".join(["a woman in a red coat and black boots"] * 15), "the person has long hair"]
    official = tok(captions, padding="longest", max_length=100, return_tensors="pt")
    assert official["input_ids"].shape[1] > 120  # every token kept
    cfg = load_config("ivt", [f"data.url={synth_tiny}"])
    ids, mask = trim_padding(*tokenize(tok, captions, cfg.data.text_length))
    assert torch.equal(ids, official["input_ids"]) and torch.equal(mask, official["attention_mask"])


def test_evaluation_and_search_cut_ivt_s_text_padding(synth_tiny):
    """With a long data.text_length, IVT's evaluation and search encode each batch of captions cut to its longest
    (IVT's own evaluation pads to the longest too): the features are those of the padded captions (padding is
    masked), at a fraction of the cost."""
    from tbps.data import build_eval_loader
    from tbps.retrieval import embed, encode_queries

    cfg = load_config("ivt_tiny", _overrides(synth_tiny, "data.text_length=64"))
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    torch.manual_seed(0)
    method = create_method(cfg, TextSpec.from_tokenizer(tok, 64), 10).eval()
    encode, seen = method.encode_text, []
    method.encode_text = lambda ids, mask: (seen.append(ids.shape[1]), encode(ids, mask))[1]
    batches = list(build_eval_loader(cfg.data, tok, "test", 4))
    out = embed(method, build_eval_loader(cfg.data, tok, "test", 4))
    longest = [int(b["text_mask"].sum(dim=1).max()) for b in batches]
    assert seen == longest and max(longest) < 64
    with torch.no_grad():
        padded = torch.cat([encode(b["text_ids"], b["text_mask"]) for b in batches])
    assert torch.allclose(out["txt"], padded, atol=1e-5)
    seen.clear()
    queries = ["a woman in a red coat", "a man"]
    vectors = encode_queries(method, cfg, tok, queries)
    assert seen == [len(tok(queries[0])["input_ids"])]
    with torch.no_grad():
        ids, mask = (tok(queries, padding="max_length", max_length=64, return_tensors="pt")[k]
                     for k in ("input_ids", "attention_mask"))
        assert torch.allclose(vectors, method.search_vectors(encode(ids, mask), "text"), atol=1e-5)


def test_rstpreid_preset_is_train_rstp_s_recipe():
    """train_rstp.py runs configs/RSTPReID/vit_base_uvt_bert.yml (the CUHK-PEDES config but for the dataset's name)
    and, unlike the CUHK-PEDES and ICFG-PEDES scripts, leaves its STRIDE_SIZE [16, 16]; its --batch_size is 48.
    Everything else is the ivt preset's."""
    from tbps.config import flatten, to_dict

    ivt, rstp = (flatten(to_dict(load_config(p)), ("image_overrides",)) for p in ("ivt", "ivt_rstpreid"))
    assert {k for k in ivt.keys() | rstp.keys() if ivt.get(k) != rstp.get(k)} == {
        "model.patch_stride", "data.batch_size", "train.run_name"}
    cfg = load_config("ivt_rstpreid")
    assert (cfg.model.patch_stride, cfg.data.batch_size, cfg.data.identity_blocks) == (16, 48, 4)
    assert cfg.data.batch_size % (cfg.data.identity_blocks * cfg.data.instances_per_id) == 0  # blocks of 3 ids x 4


def test_linear_init_is_the_official_one_unless_set_to_torch(synth_tiny):
    """vit_vl.py's ``_init_weights``: every Linear of the tower N(0, 0.02) truncated at +-2, biases zero (the `ivt`
    preset, ``method.linear_init: trunc_normal``); ``torch`` keeps PyTorch's defaults (the tiny preset, which trains
    from scratch much faster with them). Embeddings and LayerNorms are the same either way."""
    tok = load_tokenizer(os.path.join(synth_tiny, "tokenizer"))
    assert load_config("ivt").method.linear_init == "trunc_normal" and \
        load_config("ivt_tiny").method.linear_init == "torch"
    towers = {}
    for init in ("trunc_normal", "torch"):
        torch.manual_seed(0)
        cfg = load_config("ivt_tiny", _overrides(synth_tiny, "model.shared_width=96", "model.shared_layers=2",
                                                 f"method.linear_init={init}"))
        towers[init] = create_method(cfg, TextSpec.from_tokenizer(tok, cfg.data.text_length), 10).tower
    linears = {init: [m for m in t.modules() if isinstance(m, nn.Linear)] for init, t in towers.items()}
    assert len(linears["torch"]) == 2 * 2 + 2 * 2 * 2  # per block: qkv, proj, and two FFNs of fc1, fc2
    weights = torch.cat([m.weight.flatten() for m in linears["trunc_normal"]])
    assert abs(weights.std().item() - 0.02) < 0.001 and abs(weights.mean().item()) < 0.001
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears["trunc_normal"])
    fc1 = linears["torch"][2]  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases too
    assert fc1.weight.abs().max() <= 96 ** -0.5 and torch.count_nonzero(fc1.bias) > 0
    assert fc1.weight.std().item() > 0.04
    assert torch.equal(towers["torch"].word_embeddings.weight, towers["trunc_normal"].word_embeddings.weight)
    # a run started before the key existed (its config.yaml without it) resumes: its weights come from its checkpoint
    import copy

    from tbps.config import to_dict
    from tbps.engine.launcher import training_changes
    from tbps.engine.loop import as_saved

    saved = to_dict(as_saved(copy.deepcopy(cfg)))
    del saved["method"]["linear_init"]
    assert training_changes(saved, cfg) == ({}, {})
