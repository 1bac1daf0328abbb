"""MONAI VISTA3D (He et al. 2024) used as an ordinary C-class segmentation network (automatic head only).

VISTA3D predicts one sigmoid logit map per requested class (``class_vector``), not a softmax over classes, and
has no ``out_channels``. :class:`VISTA3DAuto` asks for a fixed list of VISTA3D label ids and prepends a
constant background logit of 0, so ``argmax`` over ``[0, l_1, ..., l_K]`` labels a voxel with class ``k`` exactly
when ``l_k`` is the largest logit and ``sigmoid(l_k) > 0.5`` -- VISTA3D's own decision rule for non-overlapping
classes. The module *is* MONAI's ``VISTA3D`` built by ``vista3d132`` (the paper's configuration), so its
state-dict keys are the released bundle's and ``model.pt`` loads strictly; only ``forward`` differs.

Only ``image_encoder.encoder``, ``image_encoder.up_layers_auto`` and ``class_head`` run on this path; the point
head (interactive prompts) and the point decoder keep their weights for checkpoint compatibility.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.vista3d import VISTA3D, vista3d132


class VISTA3DAuto(VISTA3D):
    """VISTA3D automatic segmentation returning ``[B, 1 + K, D, H, W]`` logits (channel 0: background, 0).

    Args:
        in_channels: image channels (1 for CT).
        out_channels: 1 + K output channels (background plus K structures).
        class_ids: VISTA3D label ids of the K structures, in the dataset's class order. ``None`` means
            ``1..K``, which is only right for a model fine-tuned with that label order; for the released
            VISTA3D, give the ids of its label dictionary (e.g. liver 1, spleen 3, pancreas 4, ...).
        encoder_embed_dim: encoder width (48 in the paper).
    """

    #: Sub-modules the automatic path never runs (not quantized; see :func:`mqb.quant.quantizable_layers`).
    mqb_unused_modules = ("point_head", "image_encoder.up_layers")

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 14,
        class_ids: Sequence[int] | None = None,
        encoder_embed_dim: int = 48,
    ) -> None:
        reference = vista3d132(encoder_embed_dim=encoder_embed_dim, in_channels=in_channels)
        super().__init__(reference.image_encoder, reference.class_head, reference.point_head)
        ids = list(range(1, out_channels)) if class_ids is None else [int(i) for i in class_ids]
        if len(ids) != out_channels - 1:
            raise ValueError(
                f"VISTA3DAuto: class_ids has {len(ids)} ids but out_channels={out_channels} needs "
                f"{out_channels - 1} (one per foreground class; channel 0 is the background)"
            )
        if any(i < 1 or i > 512 for i in ids):
            raise ValueError(f"VISTA3DAuto: class_ids must be VISTA3D label ids in 1..512, got {ids}")
        self.out_channels = out_channels
        self.register_buffer("class_vector", torch.tensor(ids, dtype=torch.long).view(-1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Logits ``[B, 1 + K, D, H, W]``: a zero background channel, then VISTA3D's logit per class."""
        logits = super().forward(x, class_vector=self.class_vector, transpose=True)
        background = torch.zeros_like(logits[:, :1])
        return torch.cat([background, logits], dim=1)
