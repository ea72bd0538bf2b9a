"""IVT (Shu et al., ECCV 2022 workshops): one shared network, multi-level alignment (MLA), bidirectional mask
modelling (BMM), CMPM over every image view and every text level — as the official code trains it
(processor.do_train_cuhkpedes_uvt_level_data).

Training batch: ``images`` [B, 3, C, H, W] (three augmented views) and ``mla_ids``/``mla_mask`` [B, 3, L]
(sentence, phrase, word). All 3B images go through one forward and all 3B texts through another, so BMM removes the
same positions from every image and from every text of the batch; one CMPM takes all same-identity pairs as
positives, across views and levels. Contrastive losses use this rank's batch only by default (``method.gather``),
as each official GPU does.
"""

from __future__ import annotations

from torch import nn

from tbps import losses as L
from tbps.data.needs import DataNeeds
from tbps.data.text import trim_padding
from tbps.models import SharedTower, WeightLoadError
from tbps.models.clip import resize_grid
from tbps.models.shared import grid_of

from .base import Method, register


@register("ivt")
class IVT(Method):
    backbone_prefixes = ("tower.",)
    default_gather = False  # the official code computes CMPM on each GPU's local batch
    text_padding = "longest"  # the official tokenizer call pads to the longest caption (training: trim_padding)

    def __init__(self, config, model, image_size, text, num_classes):
        super().__init__(config, text, num_classes)
        self.image_size = tuple(image_size)
        self.pretrained_grid = model.pretrained_grid  # an IVT checkpoint whose patch grid differs: keep | resize
        self.image_pretrained = model.image_pretrained  # (named when model.pretrained's grid tables are skipped)
        patch = int(model.image_overrides.get("patch_size", 16))
        self.tower = SharedTower(text.vocab_size, text.length, self.image_size, model.shared_width,
                                 model.shared_layers, model.shared_heads, patch=patch, stride=model.patch_stride,
                                 pad_id=text.pad_id, drop_path=model.drop_path, text_dropout=model.text_dropout)
        if config.linear_init == "trunc_normal":
            self.tower.init_linear_official()
        if self.wants("id"):
            self.classifier = nn.Linear(model.shared_width, num_classes)

    def load_tower_weights(self, image_url, text_url):
        if image_url:
            self.tower.load_vit(image_url)
        if text_url:
            self.tower.load_bert(text_url)

    def load_pretrained(self, checkpoint) -> None:
        """An official IVT checkpoint (``tbps.methods.pretrained.IvtCheckpoint``), strictly: every tower key must
        come from it, except the position / type tables of a pretrained model whose grid differs
        (``model.pretrained_grid``)."""
        if getattr(checkpoint, "format", "") != "ivt":
            return super().load_pretrained(checkpoint)
        state = dict(checkpoint.state)
        n = self.tower.position_embeddings.num_embeddings
        state["position_embeddings.weight"] = state["position_embeddings.weight"][:n]
        own = self.tower.state_dict()
        skipped = []
        if state["pos_embed"].shape != own["pos_embed"].shape:
            if self.pretrained_grid == "resize":
                old = self._checkpoint_grid(checkpoint)
                for key in ("pos_embed", "type_embed"):
                    state[key] = resize_grid(state[key][0], self.tower.grid, old)
            else:  # official: copy_ fails on the shape, the tables already there stay
                skipped = ["pos_embed", "type_embed"]
                for key in skipped:
                    state.pop(key)
        self.tower.load_mapped(state, [k for k in own if k not in skipped], checkpoint.source, "model.pretrained")
        if skipped:
            where = "the ImageNet ViT's (model.image_pretrained)" if self.image_pretrained else \
                "their random initialisation (set model.image_pretrained as the official fine-tuning does)"
            print(f"[tbps] model.pretrained: the position and type tables of {checkpoint.source} "
                  f"({checkpoint.grid_tokens} patches) do not fit the {self.tower.grid[0]}x{self.tower.grid[1]} grid "
                  f"and were skipped, as the official code does; they stay {where}. "
                  "model.pretrained_grid=resize resizes them instead")

    def _checkpoint_grid(self, checkpoint) -> tuple[int, int]:
        from .pretrained import stride_for

        stride = stride_for(checkpoint.grid_tokens, self.image_size, self.tower.patch)
        if not stride:
            raise WeightLoadError(f"model.pretrained: cannot tell the patch grid of {checkpoint.source} "
                                  f"({checkpoint.grid_tokens} patches) at data.image_size {self.image_size}; "
                                  "use model.pretrained_grid=keep")
        return grid_of(self.image_size, self.tower.patch, stride)

    def data_needs(self):
        return DataNeeds(views=3, mla=True)

    def encode_image(self, images):
        return self.tower.forward_image(images)

    def encode_text(self, ids, mask):
        return self.tower.forward_text(ids, mask)

    def features(self, batch):
        images = batch["images"]
        if images.ndim == 4:  # a single view (e.g. a plain batch): treat as one level
            images = images[:, None]
        if "mla_ids" in batch:
            ids, mask = trim_padding(batch["mla_ids"], batch["mla_mask"], batch.get("mla_length"))
        else:  # one text level
            ids, mask = trim_padding(batch["text_ids"][:, None], batch["text_mask"][:, None])
        B, V = images.shape[:2]
        r = self.config.bmm_max_drop if self.training else 0.0
        v = self.tower.forward_image(images.flatten(0, 1), bmm_max_drop=r)  # [B*V, D]
        t = self.tower.forward_text(ids.flatten(0, 1), mask.flatten(0, 1), bmm_max_drop=r)  # [B*levels, D]
        pids_v = batch["pids"].repeat_interleave(V)
        pids_t = batch["pids"].repeat_interleave(ids.shape[1])
        if len(pids_v) != len(pids_t):
            raise ValueError(f"IVT needs as many image views as text levels, got {V} and {ids.shape[1]}")
        local = {}
        if self.wants("id"):
            local["id"] = L.id_loss(self.classifier(v), self.classifier(t), batch["train_ids"].repeat_interleave(V))
        return {"v": v, "t": t, "pids": pids_v}, local

    def batch_losses(self, f):
        return {kind: self.contrastive(kind, f["v"], f["t"], f["pids"]) for kind in ("cmpm", "sdm") if self.wants(kind)}

