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


class SeededItems(torch.utils.data.Dataset):
    """A training dataset whose random transforms depend on the item alone, not on the loader's workers.

    MONAI seeds its random transforms once per DataLoader worker (``worker_init_fn``), so the patches, flips and
    intensity shifts a volume gets depend on which worker loads it, hence on ``num_workers``. Here each item is
    asked for as ``(index, item_seed)`` (:class:`SeededSampler`) and the wrapped dataset's random transforms are
    re-seeded with ``item_seed`` before it is loaded: the same batches for any worker count.
    """

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):  # type: ignore[no-untyped-def]
        from monai.data.utils import set_rnd

        index, item_seed = key
        set_rnd(self.dataset, seed=int(item_seed))
        return self.dataset[int(index)]


class SeededSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """A shuffled epoch of ``(index, item_seed)`` pairs drawn from ``(seed, epoch)`` alone (Lightning calls
    :meth:`set_epoch` before each epoch), independent of the global random state and of the loader's workers."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = int(size)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):  # type: ignore[no-untyped-def]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        seeds = torch.randint(0, 2**31 - 1, (self.size,), generator=generator).tolist()
        return iter(zip(order, seeds, strict=True))


def seeded_train_loader(datamodule: L.LightningDataModule, seed: int) -> torch.utils.data.DataLoader:
    """``datamodule``'s training loader (its dataset, batch size, workers and collation) with :class:`SeededItems`
    and :class:`SeededSampler`: the same batches for a given ``seed`` whatever ``num_workers`` is."""
    loader = datamodule.train_dataloader()
    return type(loader)(
        SeededItems(loader.dataset),
        batch_size=loader.batch_size,
        sampler=SeededSampler(len(loader.dataset), seed),  # type: ignore[arg-type]
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        drop_last=loader.drop_last,
    )


class StepProgressBar(L.pytorch.callbacks.RichProgressBar):
    """Lightning's rich progress bar counting optimizer steps toward ``max_steps`` across epochs ("Training
    120/300 • elapsed • time left"), where training is bounded by steps: the default counts batches of each epoch
    under "Epoch 4/-2" (``max_epochs=-1``), with no total and no time left."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'Training':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_disabled:
            return
        if self.progress is not None and self.train_progress_bar_id is None:
            self.train_progress_bar_id = self._add_task(trainer.max_steps, self._get_train_description(0))
        self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
        if not self.is_disabled and self.train_progress_bar_id is None:
            self.on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
