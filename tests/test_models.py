"""Encoders: weight loading from disk / S3 gives the library's own outputs; bad checkpoints give clear errors."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from tbps.models import ImageTower, SharedTower, TextTower, WeightLoadError
from tbps.data.text import trim_padding
from tbps.models.shared import bmm_keep

TINY_VIT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _timm_vit(size=(48, 16), **kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, global_pool="", img_size=size,
                             **{**TINY_VIT, **kw}).eval()


def test_timm_weights_load_and_match_library(tmp_path):
    ref = _timm_vit()
    path = str(tmp_path / "vit.safetensors")
    save_file(ref.state_dict(), path)
    tower = ImageTower("vit_tiny_patch16_224", (48, 16), overrides=TINY_VIT).eval()
    tower.load_pretrained(path)
    x = torch.randn(2, 3, 48, 16)
    assert torch.equal(tower(x), ref.forward_features(x))


def test_position_embeddings_resize_to_person_grid(tmp_path):
    square = _timm_vit(size=(32, 32))  # 4x4 grid, like CLIP's square 14x14
    path = str(tmp_path / "sq.pth")
    torch.save(square.state_dict(), path)
    tower = ImageTower("vit_tiny_patch16_224", (48, 16), overrides=TINY_VIT)  # 6x2 grid
    tower.load_pretrained(path)
    assert tower.vit.pos_embed.shape == (1, 1 + 6 * 2, 32)


def test_patch_stride_overlapping():
    tower = ImageTower("vit_tiny_patch16_224", (48, 16), patch_stride=4, overrides=TINY_VIT)
    out = tower(torch.randn(1, 3, 48, 16))
    assert out.shape == (1, 1 + 11 * 3, 32)  # ((48-8)/4+1) x ((16-8)/4+1)


def test_corrupt_and_mismatched_checkpoints_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    tower = ImageTower("vit_tiny_patch16_224", (48, 16), overrides=TINY_VIT)
    with pytest.raises(WeightLoadError, match="cannot read checkpoint"):
        tower.load_pretrained(str(bad))
    other = tmp_path / "deeper.safetensors"
    save_file(_timm_vit(depth=3).state_dict(), str(other))
    with pytest.raises(WeightLoadError, match=r"unexpected keys: blocks\.2\."):
        tower.load_pretrained(str(other))
    with pytest.raises(WeightLoadError, match="checkpoint not found"):
        tower.load_pretrained(str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("kind", ["clip", "bert"])
def test_transformers_text_towers_load_and_match(tmp_path, kind):
    from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModel

    if kind == "clip":
        ref = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, max_position_embeddings=16, bos_token_id=1,
                                           eos_token_id=2, pad_token_id=0)).eval()
    else:
        ref = BertModel(BertConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2), add_pooling_layer=False).eval()
    ref.save_pretrained(str(tmp_path / "text"))
    tower = TextTower(kind, vocab_size=50, length=16, width=32, layers=2, heads=2)
    tower.load_pretrained(str(tmp_path / "text"))
    tower.eval()
    ids = torch.randint(3, 50, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ours, theirs = tower(ids, mask), ref(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()  # CLIP's causal tower runs without a padding mask (as OpenAI's): real tokens are identical
    assert torch.allclose(ours[real], theirs[real], atol=1e-6)
    if kind == "bert":
        assert torch.allclose(ours, theirs, atol=1e-6)
    wrong_vocab = TextTower(kind, vocab_size=60, length=16, width=32, layers=2, heads=2)
    with pytest.raises(WeightLoadError, match="vocab"):
        wrong_vocab.load_pretrained(str(tmp_path / "text"))


def test_text_dropout_is_the_runs_own(tmp_path, synth_tiny):
    """model.text_dropout sets a BERT tower's hidden and attention dropout, also over a loaded checkpoint's
    config.json (bert-base's says 0.1); the CLIP text tower has no dropout, so a value > 0 is refused
    (tests/test_config.py: before any worker starts) instead of being read by nothing. The PCC preset keeps
    bert-base's 0.1."""
    from transformers import BertConfig, BertModel

    from tbps.config import ConfigError, load_config
    from tbps.engine.launcher import preflight
    from tbps.methods import TextSpec, build_method

    ids, mask = torch.randint(3, 50, (2, 10)), torch.ones(2, 10, dtype=torch.long)

    def random_in_training(tower) -> bool:
        tower.train()
        return not torch.equal(tower(ids, mask), tower(ids, mask))

    tower = TextTower("bert", vocab_size=50, length=16, width=32, layers=2, heads=2, dropout=0.2)
    assert (tower.model.config.hidden_dropout_prob, tower.model.config.attention_probs_dropout_prob) == (0.2, 0.2)
    assert random_in_training(tower)
    BertModel(BertConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2), add_pooling_layer=False).save_pretrained(str(tmp_path / "bert"))
    tower = TextTower("bert", vocab_size=50, length=16, width=32, layers=2, heads=2, dropout=0.0)
    tower.load_pretrained(str(tmp_path / "bert"))  # its config.json: 0.1, BERT's default
    assert tower.model.config.hidden_dropout_prob == 0.0 and not random_in_training(tower)
    with pytest.raises(ValueError, match="no dropout"):
        TextTower("clip", vocab_size=50, length=16, width=32, layers=2, heads=2, dropout=0.1)

    with pytest.raises(ConfigError, match=r"model.text_dropout must be in \[0, 1\)"):
        preflight(load_config("ivt_tiny", [f"data.url={synth_tiny}", "model.text_dropout=1.5"]))
    cfg = load_config("pcc_tiny", [f"data.url={synth_tiny}"])
    preflight(cfg)
    pcc = build_method(cfg, TextSpec(50, cfg.data.text_length, 0, 4, 2, 3), 10)
    assert pcc.text_tower.model.config.attention_probs_dropout_prob == cfg.model.text_dropout == 0.1


def test_weights_load_from_s3(tmp_path, s3_server, monkeypatch):
    import s3fs

    monkeypatch.setenv("TBPS_CACHE", str(tmp_path / "cache"))
    ref = _timm_vit()
    save_file(ref.state_dict(), str(tmp_path / "vit.safetensors"))
    s3fs.S3FileSystem(skip_instance_cache=True).put(str(tmp_path / "vit.safetensors"), "tbps/weights/vit.safetensors")
    tower = ImageTower("vit_tiny_patch16_224", (48, 16), overrides=TINY_VIT).eval()
    tower.load_pretrained("s3://tbps/weights/vit.safetensors")
    x = torch.randn(1, 3, 48, 16)
    assert torch.equal(tower(x), ref.forward_features(x))


def test_ivt_shared_tower_initialises_from_vit_and_bert(tmp_path):
    from transformers import BertConfig, BertModel

    vit = _timm_vit(size=(32, 32))
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2), add_pooling_layer=False)
    bert.save_pretrained(str(tmp_path / "bert"))
    tower = SharedTower(vocab_size=50, text_length=16, image_size=(48, 16), width=32, layers=2, heads=2, patch=8)
    tower.load_vit(str(tmp_path / "vit.safetensors"))
    tower.load_bert(str(tmp_path / "bert"))
    assert torch.equal(tower.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert torch.equal(tower.blocks[0].mlp.image.fc1.weight, vit.blocks[0].mlp.fc1.weight)
    assert torch.equal(tower.blocks[0].mlp.text.fc1.weight, bert.encoder.layer[0].intermediate.dense.weight)
    assert torch.equal(tower.blocks[1].mlp.text.fc2.bias, bert.encoder.layer[1].output.dense.bias)
    assert torch.equal(tower.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    assert tower.pos_embed.shape == (1, 1 + 12, 32)
    out = tower.forward_text(torch.randint(5, 50, (2, 16)), torch.ones(2, 16, dtype=torch.long))
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    with pytest.raises(WeightLoadError, match="missing keys"):
        SharedTower(vocab_size=50, text_length=16, image_size=(48, 16), width=32, layers=3, heads=2,
                    patch=8).load_vit(str(tmp_path / "vit.safetensors"))


def test_bmm_keeps_cls_and_draws_the_count_from_0_to_the_bound():
    g = torch.Generator().manual_seed(0)
    counts = set()
    for _ in range(400):
        keep = bmm_keep(25, 0.2, g)  # N = 25 positions: k in 0..floor(0.2 * 25) = 0..5
        assert keep[0] == 0 and (keep.diff() > 0).all()
        counts.add(25 - len(keep))
    assert counts == set(range(6))
    assert len(bmm_keep(3, 0.99, g)) >= 1  # never more than N - 1 dropped
    assert torch.equal(bmm_keep(10, 0.0, g), torch.arange(10))


def test_trim_padding_cuts_to_the_longest_caption_of_the_batch():
    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [5, 6, 0, 0, 0, 0]])
    mask = (ids > 0).long()
    t_ids, t_mask = trim_padding(ids, mask)
    assert t_ids.shape == (2, 3) and torch.equal(t_mask, mask[:, :3])


def test_attention_runs_through_pytorch_sdpa():
    """Both towers use fused attention (F.scaled_dot_product_attention), which bench/train_step.py relies on."""
    from tbps.config import load_config
    from tbps.methods import TextSpec, build_method

    cfg = load_config("irra_tiny")
    m = build_method(cfg, TextSpec(vocab_size=60, length=12, pad_id=0, mask_id=1, bos_id=2, eos_id=3), 10)
    assert m.text_tower.model.config._attn_implementation == "sdpa"
    assert all(blk.attn.fused_attn for blk in m.image_tower.vit.blocks)
