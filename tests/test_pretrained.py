"""Starting from the papers' weights (#13): whole-CLIP checkpoints in OpenAI's, open_clip's and transformers' layouts,
IRRA's heads and IRRA run directories, checked against a plain-torch reference of the official architectures written
here (OpenAI's CLIP as IRRA's model/clip_model.py builds it; IRRA's cross-modal encoder as model/build.py does).
Every checkpoint is tiny, random and made by the test; nothing is downloaded."""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from tbps.config import ConfigError, load_config
from tbps.data import load_tokenizer
from tbps.methods import TextSpec, create_method
from tbps.models import WeightLoadError

WIDTH, LAYERS, EMBED, PATCH, RES = 64, 2, 32, 16, 64  # a ViT-"B/16"-shaped CLIP, 64 wide, 2 deep, 4x4 grid
CAPTIONS = ["A woman in a RED coat &amp; black boots carrying a bag.", "a man wearing \u201cwhite\u201d sneakers",
            " ".join(["the person has long hair and a dark jacket"] * 12)]


# ------------------------------------------------------------------------------- reference: OpenAI's architecture
class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefBlock(nn.Module):
    """OpenAI's ResidualAttentionBlock (sequence-first, nn.MultiheadAttention)."""

    def __init__(self, d, heads, act, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("gelu", act()),
                                              ("c_proj", nn.Linear(4 * d, d))]))
        self.ln_2 = nn.LayerNorm(d)
        self.attn_mask = attn_mask

    def forward(self, x):
        x = x + self.attn(self.ln_1(x), self.ln_1(x), self.ln_1(x), need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, d, layers, heads, act, attn_mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[RefBlock(d, heads, act, attn_mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class RefVisual(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTH, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(WIDTH) * WIDTH ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn((RES // PATCH) ** 2 + 1, WIDTH) * WIDTH ** -0.5)
        self.ln_pre = nn.LayerNorm(WIDTH)
        self.transformer = RefTransformer(WIDTH, LAYERS, WIDTH // 64, act)
        self.ln_post = nn.LayerNorm(WIDTH)
        self.proj = nn.Parameter(torch.randn(WIDTH, EMBED) * WIDTH ** -0.5)

    def tokens(self, x):
        """IRRA's VisionTransformer.forward: every token through ln_post and proj; the square grid resized
        bilinearly (F.interpolate, align_corners=False) to the input's grid."""
        x = self.conv1(x)
        h, w = int(x.shape[-2]), int(x.shape[-1])
        pos = self.positional_embedding
        g = math.isqrt(int(pos.shape[0]) - 1)
        if (h, w) != (g, g):
            grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bilinear").permute(0, 2, 3, 1).reshape(h * w, -1)
            pos = torch.cat([pos[:1], grid])
        x = x.flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding + torch.zeros(len(x), 1, WIDTH, dtype=x.dtype), x], dim=1) + pos
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x) @ self.proj


class RefCLIP(nn.Module):
    def __init__(self, act=QuickGELU, context=77, vocab=49408):
        super().__init__()
        self.visual = RefVisual(act)
        causal = torch.full((context, context), float("-inf")).triu_(1)
        self.transformer = RefTransformer(WIDTH, LAYERS, WIDTH // 64, act, causal)
        self.token_embedding = nn.Embedding(vocab, WIDTH)
        self.positional_embedding = nn.Parameter(torch.randn(context, WIDTH) * 0.01)
        self.ln_final = nn.LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(torch.randn(WIDTH, EMBED) * WIDTH ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        with torch.no_grad():  # fp16 values, as OpenAI ships them: every format below holds the same numbers
            for p in self.parameters():
                noise = torch.randn_like(p) * 0.01 if p.ndim == 1 else 0  # LayerNorms and biases away from 1/0
                p.copy_((p + noise).half().float())

    def text_tokens(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_final(x) @ self.text_projection

    def encode_image(self, images):
        return self.visual.tokens(images)[:, 0]

    def encode_text(self, ids):
        return self.text_tokens(ids)[torch.arange(len(ids)), ids.argmax(dim=-1)]  # end-of-text: the largest id

    def forward(self, images, ids):
        return self.encode_image(images), self.encode_text(ids)


class RefIRRAHeads(nn.Module):
    """IRRA's model/build.py heads: cross_attn (no residual), ln_pre_t/ln_pre_i, cross_modal_transformer (OpenAI
    blocks, no mask), ln_post, mlm_head (dense, QuickGELU, ln, fc), classifier."""

    def __init__(self, num_classes, depth=2, vocab=49408):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(EMBED, max(1, EMBED // 64), batch_first=True)
        self.cross_modal_transformer = RefTransformer(EMBED, depth, max(1, EMBED // 64), QuickGELU)
        self.ln_pre_t, self.ln_pre_i, self.ln_post = nn.LayerNorm(EMBED), nn.LayerNorm(EMBED), nn.LayerNorm(EMBED)
        self.mlm_head = nn.Sequential(OrderedDict([("dense", nn.Linear(EMBED, EMBED)), ("gelu", QuickGELU()),
                                                   ("ln", nn.LayerNorm(EMBED)), ("fc", nn.Linear(EMBED, vocab))]))
        self.classifier = nn.Linear(EMBED, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_((p + torch.randn_like(p) * 0.02).half().float())

    def mlm_logits(self, text_tokens, image_tokens):
        k = self.ln_pre_i(image_tokens)
        x = self.cross_attn(self.ln_pre_t(text_tokens), k, k, need_weights=False)[0]
        x = self.cross_modal_transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.mlm_head(self.ln_post(x))


def clip_tokens(captions, length=77):
    return load_tokenizer("clip")(captions, padding="max_length", truncation=True, max_length=length,
                                  return_tensors="pt")


def _method(pretrained, *overrides, config="irra"):
    cfg = load_config(config, [f"model.pretrained={pretrained}", "method.cross_layers=2", *overrides])
    tok = load_tokenizer("clip")
    method = create_method(cfg, TextSpec.from_tokenizer(tok, cfg.data.text_length), 10, log=None)
    return method.eval(), cfg


def _check_against(method, ref, image_size=(384, 128)):
    torch.manual_seed(3)
    images = torch.randn(2, 3, *image_size)
    enc = clip_tokens(CAPTIONS)
    with torch.no_grad():
        assert torch.allclose(method.encode_image(images), ref.encode_image(images), atol=1e-5)
        assert torch.allclose(method.encode_text(enc["input_ids"], enc["attention_mask"]),
                              ref.encode_text(enc["input_ids"]), atol=1e-5)


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return RefCLIP().eval()


# ----------------------------------------------------------------------------------------------- CLIP formats
def test_openai_torchscript_archive_loads_whole_clip(ref, tmp_path):
    """OpenAI's ViT-B-16.pt is a TorchScript archive of fp16 weights: loaded as shipped, CLIP's projections too."""
    path = str(tmp_path / "ViT-T-16.pt")
    with torch.no_grad():
        traced = torch.jit.trace(_half_copy(ref), (torch.randn(1, 3, RES, RES).half(), torch.zeros(1, 77).long()),
                                 check_trace=False)
    torch.jit.save(traced, path)
    assert traced.state_dict()["visual.proj"].dtype == torch.float16
    method, cfg = _method(path)
    _check_against(method, ref)
    # the architecture came from the weights, QuickGELU from the format
    assert cfg.model.image_overrides == {"patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 1}
    assert (cfg.model.text_width, cfg.model.text_layers, cfg.model.embed_dim) == (64, 2, 32)
    assert cfg.model.activation == "quick_gelu"
    # CLIP's joint space is kept: the projections are CLIP's, at the base lr
    assert torch.equal(method.image_proj.weight, ref.visual.proj.t())
    groups = {id(p): g for g in method.param_groups(cfg.optim) for p in g["params"]}
    assert groups[id(method.image_proj.weight)]["lr"] == cfg.optim.lr


def _half_copy(ref):
    model = RefCLIP().eval()
    model.load_state_dict(ref.state_dict())
    return model.half()


def test_openai_plain_fp16_state_dict_and_any_input_size(ref, tmp_path):
    sd = {k: v.half() for k, v in ref.state_dict().items()}
    sd.update({"input_resolution": torch.tensor(RES), "context_length": torch.tensor(77),
               "vocab_size": torch.tensor(49408)})  # the ints OpenAI's archives carry
    torch.save(sd, tmp_path / "clip.pt")
    method, _ = _method(str(tmp_path / "clip.pt"))
    _check_against(method, ref)
    # the same preset at the checkpoint's own 64x64 (a square grid, no resize) and with a 12-pixel stride (IVT-style)
    method, _ = _method(str(tmp_path / "clip.pt"), f"data.image_size=[{RES},{RES}]")
    _check_against(method, ref, (RES, RES))


def test_open_clip_checkpoint_equals_open_clip_model(tmp_path):
    """A real open_clip CLIP (GELU, its own layout) saved as open_clip writes it: our features equal its own."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(1)
    oc = CLIP(EMBED, CLIPVisionCfg(layers=LAYERS, width=WIDTH, patch_size=PATCH, image_size=RES, head_width=64),
              CLIPTextCfg(context_length=77, vocab_size=49408, width=WIDTH, heads=1, layers=LAYERS)).eval()
    os.makedirs(tmp_path / "oc")
    torch.save(oc.state_dict(), tmp_path / "oc" / "open_clip_pytorch_model.bin")
    torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in oc.state_dict().items()}},
               tmp_path / "epoch_3.pt")  # open_clip's training checkpoint
    images, enc = torch.randn(2, 3, RES, RES), clip_tokens(CAPTIONS)
    for path in (str(tmp_path / "oc"), str(tmp_path / "epoch_3.pt")):
        method, cfg = _method(path, f"data.image_size=[{RES},{RES}]", "method.learnable_temperature=true")
        assert cfg.model.activation == "gelu"
        with torch.no_grad():
            assert torch.allclose(method.encode_image(images), oc.encode_image(images), atol=1e-5)
            assert torch.allclose(method.encode_text(enc["input_ids"], enc["attention_mask"]),
                                  oc.encode_text(enc["input_ids"]), atol=1e-5)
        assert torch.allclose(method.logit_scale, oc.logit_scale.exp())  # a learnable temperature starts at CLIP's


def test_transformers_clip_model_directory(ref, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(2)
    common = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=1)
    hf = CLIPModel(CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                               eos_token_id=49407, pad_token_id=0, **common),
                              vision_config=dict(image_size=RES, patch_size=PATCH, **common),
                              projection_dim=EMBED)).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    images, enc = torch.randn(2, 3, RES, RES), clip_tokens(CAPTIONS)
    method, cfg = _method(str(tmp_path / "hf"), f"data.image_size=[{RES},{RES}]")
    assert cfg.model.activation == "quick_gelu"

    def features(out):
        return out if torch.is_tensor(out) else out.pooler_output
    with torch.no_grad():
        assert torch.allclose(method.encode_image(images), features(hf.get_image_features(pixel_values=images)),
                              atol=1e-5)
        assert torch.allclose(method.encode_text(enc["input_ids"], enc["attention_mask"]),
                              features(hf.get_text_features(input_ids=enc["input_ids"],
                                                            attention_mask=enc["attention_mask"])), atol=1e-5)


def test_pretrained_from_s3(ref, tmp_path, s3_server, monkeypatch):
    import s3fs

    monkeypatch.setenv("TBPS_CACHE", str(tmp_path / "cache"))
    torch.save(ref.state_dict(), tmp_path / "clip.pt")
    s3fs.S3FileSystem(skip_instance_cache=True).put(str(tmp_path / "clip.pt"), "tbps/clip/ViT-T-16.pt")
    method, _ = _method("s3://tbps/clip/ViT-T-16.pt")
    _check_against(method, ref)


def test_bad_pretrained_checkpoints_are_clear_errors(ref, tmp_path):
    from tbps.config import ConfigError

    with pytest.raises(WeightLoadError, match="checkpoint not found"):
        _method(str(tmp_path / "missing.pt"))
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(WeightLoadError, match="not a CLIP checkpoint"):
        _method(str(tmp_path / "other.pt"))
    sd = dict(ref.state_dict())
    sd["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(WIDTH)
    torch.save(sd, tmp_path / "variant.pt")
    with pytest.raises(WeightLoadError, match="ls_1"):
        _method(str(tmp_path / "variant.pt"))
    sd = dict(ref.state_dict())
    sd["token_embedding.weight"] = sd["token_embedding.weight"][:1000]
    torch.save(sd, tmp_path / "vocab.pt")
    with pytest.raises(ConfigError, match="vocabulary of 1000 tokens.*data.tokenizer=clip"):
        _method(str(tmp_path / "vocab.pt"))
    torch.save(ref.state_dict(), tmp_path / "clip.pt")
    with pytest.raises(WeightLoadError, match="whole CLIP checkpoint; give it as model.pretrained"):
        tower_only = load_config("irra_tiny", [f"model.image_pretrained={tmp_path / 'clip.pt'}"])
        create_method(tower_only, TextSpec(60, 48, 0, 1, 2, 3), 10, log=None)


# ----------------------------------------------------------------------------------------------------- IRRA
def _irra_run(tmp_path, ref, num_classes=10):
    """An official IRRA output dir: best.pth = {"model": state_dict} (CLIP at 24x8, heads, fp16 linear layers as
    IRRA's convert_weights leaves them) + configs.yaml (yaml.dump of IRRA's args, img_size a tuple)."""
    torch.manual_seed(5)
    heads = RefIRRAHeads(num_classes).eval()
    sd = {}
    clip = {k: v.clone() for k, v in ref.state_dict().items() if k != "logit_scale"}
    with torch.no_grad():  # IRRA saves the position table it resized at load time (24x8 at 384x128)
        pos = clip["visual.positional_embedding"]
        g = round((pos.shape[0] - 1) ** 0.5)
        resized = F.interpolate(pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2), size=(24, 8), mode="bilinear")
        clip["visual.positional_embedding"] = torch.cat([pos[:1], resized.permute(0, 2, 3, 1).reshape(192, -1)])
    sd.update({"base_model." + k: v for k, v in clip.items()})
    sd.update(heads.state_dict())
    linear = ("weight", "bias", "in_proj_weight", "in_proj_bias", "proj", "text_projection")
    sd = {k: v.half() if k.endswith(linear) and "ln" not in k and v.ndim >= 1 else v for k, v in sd.items()}
    run = tmp_path / "irra-run"
    os.makedirs(run)
    torch.save({"model": sd, "epoch": 60}, run / "best.pth")
    args = {"loss_names": "sdm+mlm+id", "img_size": (384, 128), "stride_size": 16, "temperature": 0.02,
            "cmt_depth": 2, "text_length": 77, "vocab_size": 49408, "id_loss_weight": 1.0, "mlm_loss_weight": 1.0,
            "pretrain_choice": "ViT-B/16", "dataset_name": "CUHK-PEDES", "lr": 1e-5}
    (run / "configs.yaml").write_text(yaml.dump(args, default_flow_style=False))
    assert "!!python/tuple" in (run / "configs.yaml").read_text()
    return str(run), heads


def test_irra_cross_modal_encoder_equals_official_architecture(ref, tmp_path):
    run, heads = _irra_run(tmp_path, ref)
    method, cfg = _method(run)
    assert cfg.method.cross_heads == 1 and not cfg.method.mlm_pad_mask
    torch.manual_seed(4)
    images = torch.randn(2, 3, 384, 128)
    enc = clip_tokens(CAPTIONS[:2])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    mlm_ids = ids.clone()
    mlm_ids[:, 2] = 49405
    with torch.no_grad():
        ours = method.mlm_logits({"mlm_ids": mlm_ids, "text_mask": mask}, method.image_tokens(images))
        expected = heads.mlm_logits(ref.text_tokens(mlm_ids), ref.visual.tokens(images))  # every position, pads too
        assert torch.allclose(ours, expected, atol=1e-5)
        v, t = method.encode_image(images), method.encode_text(ids, mask)
        assert torch.allclose(method.classifier(v), heads.classifier(ref.encode_image(images)), atol=1e-5)
        assert torch.allclose(t, ref.encode_text(ids), atol=1e-5)
    # the padding-mask alternative is a switch, and it changes the logits
    masked, _ = _method(run, "method.mlm_pad_mask=true")
    with torch.no_grad():
        other = masked.mlm_logits({"mlm_ids": mlm_ids, "text_mask": mask}, masked.image_tokens(images))
    assert not torch.allclose(other, ours, atol=1e-3)


def _irra_fp16(model: nn.Module) -> None:
    """What IRRA's build_model does to the model it returns (model/clip_model.py ``convert_weights``), restated:
    every Conv1d/Conv2d/Linear weight and bias, nn.MultiheadAttention's input projection tensors, and the parameters
    held under the names text_projection, proj or mcq_proj become fp16; nothing else is touched."""
    for module in model.modules():
        tensors = []
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            tensors += [module.weight, module.bias]
        if isinstance(module, nn.MultiheadAttention):
            tensors += [getattr(module, a) for a in ("in_proj_weight", "q_proj_weight", "k_proj_weight",
                                                     "v_proj_weight", "in_proj_bias", "bias_k", "bias_v")]
        tensors += [getattr(module, a, None) for a in ("text_projection", "proj", "mcq_proj")]
        for t in tensors:
            if isinstance(t, torch.Tensor):
                t.data = t.data.half()


def test_fp16_weights_convert_what_irra_converts(ref, tmp_path):
    """train.precision=fp16-weights stores in fp16 exactly the parameters IRRA's model holds in fp16 (the official
    model, built here from the reference: CLIP + IRRA's heads), and leaves the rest (LayerNorms, embeddings, position
    tables) in fp32: the same number of values each way."""
    import copy

    from tbps.methods.base import fp16_weights

    run, heads = _irra_run(tmp_path, ref)
    method, _ = _method(run)
    converted = fp16_weights(method)
    official = nn.ModuleDict({"base_model": copy.deepcopy(ref), "heads": copy.deepcopy(heads)})
    _irra_fp16(official)

    def values(model, dtype, resized=()):
        return sum(p.numel() for n, p in model.named_parameters() if p.dtype == dtype and not n.endswith(resized))

    # the official run holds its position table resized to 24x8 (+ CLS) at 384x128; the unused logit_scale is
    # CLIP's (IRRA fixes the temperature)
    pos = 24 * 8 + 1
    assert values(method, torch.float16) == values(official, torch.float16) > 0
    assert values(method, torch.float32) == (values(official, torch.float32, ("visual.positional_embedding",
                                                                              "logit_scale")) + pos * WIDTH)
    assert all(method.get_parameter(n).dtype == torch.float16 for n in converted)
    assert fp16_weights(method) == []  # nothing left to convert
    # IRRA's code base trains the CLIP baseline the same way; the CPU presets stay fp32
    assert load_config("irra").train.precision == load_config("clip").train.precision == "fp16-weights"
    assert load_config("irra_tiny").train.precision == load_config("clip_tiny").train.precision == "auto"
    # IVT's official loop is torch's AMP (fp16 autocast + GradScaler over fp32 weights)
    assert load_config("ivt").train.precision == "fp16-autocast" and load_config("ivt_tiny").train.precision == "auto"


def test_irra_heads_are_initialised_as_the_official_code():
    from tbps.methods.irra import CrossModalEncoder

    torch.manual_seed(0)
    enc = CrossModalEncoder(512, 8, 4, 49408)
    std = {"cross_attn.in_proj_weight": 512 ** -0.5, "cross_attn.out_proj.weight": 512 ** -0.5 * 8 ** -0.5,
           "blocks.0.attn.qkv.weight": 512 ** -0.5, "blocks.3.attn.proj.weight": 512 ** -0.5 * 8 ** -0.5,
           "blocks.1.mlp.fc1.weight": 1024 ** -0.5, "blocks.2.mlp.fc2.weight": 512 ** -0.5 * 8 ** -0.5,
           "mlm_head.dense.weight": 1024 ** -0.5, "mlm_head.fc.weight": 512 ** -0.5 * 8 ** -0.5}
    params = dict(enc.named_parameters())
    for name, s in std.items():
        assert abs(params[name].std().item() / s - 1) < 0.05, name
        assert abs(params[name].mean().item()) < 0.05 * s
    assert not hasattr(enc, "ln_post_attn")  # no LayerNorm between the cross-attention and the blocks
    cfg = load_config("irra_tiny")
    from tbps.methods import build_method

    m = build_method(cfg, TextSpec(60, 12, 0, 1, 2, 3), 10)
    assert abs(m.classifier.weight.std().item() - 0.001) < 1e-4 and not m.classifier.bias.any()


def test_irra_run_evaluates_and_exports_embeddings(ref, tmp_path, synth_tiny):
    """`tbps.evaluate --checkpoint <IRRA output dir>` (detected): metrics, and embeddings equal the reference's."""
    from tbps.evaluate import main

    run, _ = _irra_run(tmp_path, ref)
    out = tmp_path / "eval"
    assert main(["--checkpoint", run, "--data", synth_tiny, "--split", "test", "--out", str(out),
                 "--save-embeddings", "--batch-size", "16"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    (row,) = metrics.values()
    assert row["method"] == "irra" and 0 <= row["R1"] <= 100 and row["queries"] > 0
    emb = np.load(out / "embeddings.npz")
    assert emb["image_emb"].shape == (row["gallery"], EMBED) and emb["text_emb"].shape == (row["queries"], EMBED)
    # a row of the export equals the reference forward of that image and that caption
    from tbps.data import build_eval_loader

    cfg = load_config("irra", [f"data.url={synth_tiny}"])
    batch = next(iter(build_eval_loader(cfg.data, load_tokenizer("clip"), "test", 4)))
    with torch.no_grad():
        img = F.normalize(ref.encode_image(batch["images"]), dim=-1)
        txt = F.normalize(ref.encode_text(batch["text_ids"]), dim=-1)
    paths = list(emb["image_path"])
    for i, path in enumerate(batch["image_path"]):
        assert np.allclose(emb["image_emb"][paths.index(path)], img[i].numpy(), atol=1e-5)
    captions = list(emb["caption"])
    for j, caption in enumerate(batch["captions"]):
        assert np.allclose(emb["text_emb"][captions.index(caption)], txt[j].numpy(), atol=1e-5)
    assert set(emb["image_pid"]) == set(emb["text_pid"])


def test_irra_run_as_a_starting_point_with_another_dataset(ref, tmp_path, capsys):
    run, heads = _irra_run(tmp_path, ref, num_classes=7)
    method, _ = _method(run)  # this "dataset" has 10 identities: the classifier starts fresh, the rest is IRRA's
    assert "classifier starts fresh" in capsys.readouterr().out
    assert torch.equal(method.cross.mlm_head.fc.weight, heads.mlm_head.fc.weight)
    assert abs(method.classifier.weight.std().item() - 0.001) < 2e-4


def test_zero_shot_evaluation_with_saved_embeddings(ref, tmp_path, synth_tiny):
    from tbps.evaluate import main

    torch.save(ref.state_dict(), tmp_path / "clip.pt")
    out = tmp_path / "zs"
    assert main(["--config", "irra", f"model.pretrained={tmp_path / 'clip.pt'}", "data.tokenizer=clip",
                 "--data", synth_tiny, "--split", "test", "--save-embeddings", "--out", str(out)]) == 0
    emb = np.load(out / "embeddings.npz")
    manifest = json.loads(open(os.path.join(synth_tiny, "manifest.json")).read())
    assert emb["image_emb"].shape[0] == manifest["splits"]["test"]["images"]
    assert emb["text_emb"].shape[0] == manifest["splits"]["test"]["captions"]
    assert np.allclose(np.linalg.norm(emb["image_emb"], axis=1), 1, atol=1e-5)
    assert all(p.startswith("synth/") for p in emb["image_path"]) and all(isinstance(c, str) for c in emb["caption"])


def test_a_tbps_checkpoint_starts_a_fine_tuning_run(tmp_path, synth_tiny):
    """model.pretrained=<run>/best: pretrain, then fine-tune. Every weight but the ID classifier (the pretraining
    data's identities) comes from the checkpoint, with its architecture; another method or image size is refused."""
    from tbps.checkpoint import write_model_dir
    from tbps.config import dump_yaml
    from tbps.methods import build_method

    tok_dir = os.path.join(synth_tiny, "tokenizer")
    pre = load_config("irra_tiny", [f"data.url={synth_tiny}", f"data.tokenizer={tok_dir}", "method.cross_layers=2"])
    text = TextSpec.from_tokenizer(load_tokenizer(tok_dir), pre.data.text_length)
    torch.manual_seed(1)
    trained = build_method(pre, text, 40)
    write_model_dir(str(tmp_path / "best"), trained.state_dict(), dump_yaml(pre), {"epoch": 3, "num_classes": 40})

    fine = load_config("irra_tiny", [f"data.url={synth_tiny}", f"data.tokenizer={tok_dir}",
                                     f"model.pretrained={tmp_path / 'best'}", "model.drop_path=0.1"])
    logs = []
    method = create_method(fine, text, 7, log=logs.append)
    assert fine.method.cross_layers == 2 and fine.model.drop_path == 0.1  # its architecture, this run's regulariser
    got, want = method.state_dict(), trained.state_dict()
    for k, v in got.items():
        if k.startswith("classifier."):
            assert v.shape[0] == 7
        else:
            assert torch.equal(v, want[k]), k
    assert any("tbps irra checkpoint" in line for line in logs)
    # a run without the MLM term leaves IRRA's cross-modal encoder out, and says so
    no_mlm = load_config("irra_tiny", [f"data.url={synth_tiny}", f"data.tokenizer={tok_dir}",
                                       f"model.pretrained={tmp_path / 'best'}",
                                       "method.losses=[{name: sdm, weight: 1}]"])
    logs.clear()
    create_method(no_mlm, text, 7, log=logs.append)
    assert any("not used by this run's losses: cross" in line for line in logs), logs
    with pytest.raises(ConfigError, match=r"holds a irra model: it starts irra runs only \(this run: method.name=clip"):
        create_method(load_config("clip_tiny", [f"model.pretrained={tmp_path / 'best'}"]), text, 7, log=None)
    with pytest.raises(ConfigError, match=r"trained at data.image_size \[96, 32\]"):
        create_method(load_config("irra_tiny", [f"model.pretrained={tmp_path / 'best'}", "data.image_size=[64, 32]"]),
                      text, 7, log=None)
    # a run of another caption length (e.g. an ivt run started before the preset's 512): its position table's size
    with pytest.raises(ConfigError, match=r"trained with data.text_length 48, which sizes its text position table; "
                                          r"this run has 64: set data.text_length=48"):
        create_method(load_config("irra_tiny", [f"model.pretrained={tmp_path / 'best'}", "data.text_length=64"]),
                      TextSpec.from_tokenizer(load_tokenizer(tok_dir), 64), 7, log=None)
