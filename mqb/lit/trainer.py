"""``SegmentationTrainer``: fit a segmentation network with DiceCE loss on sampled patches."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot


class SegmentationTrainer(L.LightningModule):
    """Patch-based training (DiceCE, AdamW, cosine schedule) with whole-volume sliding-window validation."""

    def __init__(
        self,
        net: torch.nn.Module,
        num_classes: int,
        roi_size: Sequence[int],
        lr: float = 2e-3,
        weight_decay: float = 1e-5,
        max_steps: int = 1000,
        sw_batch_size: int = 2,
    ) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.roi_size = tuple(int(r) for r in roi_size)
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_steps = max_steps
        self.sw_batch_size = sw_batch_size
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.val_dice = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
        self.best_val_dsc: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.net(batch["image"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = sliding_window_inference(batch["image"], self.roi_size, self.sw_batch_size, self.net, 0.25)
        pred = one_hot(logits.argmax(1, keepdim=True), self.num_classes)
        self.val_dice(pred, one_hot(batch["label"].long(), self.num_classes))

    def on_validation_epoch_end(self) -> None:
        value = float(self.val_dice.aggregate())
        self.val_dice.reset()
        self.best_val_dsc = value if self.best_val_dsc is None else max(self.best_val_dsc, value)
        self.log("val/dsc", value, prog_bar=True)

    def configure_optimizers(self):  # type: ignore[override]
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
