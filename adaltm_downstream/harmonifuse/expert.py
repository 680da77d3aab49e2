"""`-d harmonifuse`: HarmoniFuse (Si et al.) as a comparison system for AdaLTM, on the same data and metrics.

In: every upstream hidden state (this downstream fuses layers itself: `fuses_layers_itself`), batches from an
SER source and an ASR source interleaved by `schedule`; each batch carries only its own task's labels.
Transformed: per-task fusion over layers (`fusion.variant`: `paper`, per-task softmax weights; `extended`,
prompt- and utterance-conditioned weights, then a task gate) -> CTC head (ASR) or pooled classifier (SER).
Out: both metric families in `{split}_metrics.json`, `{split}_predictions.tsv`, `{split}_transcripts.tsv`,
the learned layer weights per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from adaltm_core import settings
from adaltm_downstream.common.corpus import Utterance
from adaltm_downstream.common.ctc import AsrSettings, CTCTask, Vocabulary, normalize_text
from adaltm_downstream.common.data import DataSettings, make_loader
from adaltm_downstream.common.emotion import EmotionSettings, EmotionTask, emotion_fields, speakers_of
from adaltm_downstream.common.expert import finish_evaluation, log_train_losses
from adaltm_downstream.common.interleave import ChainedLoader, InterleavedLoader
from adaltm_downstream.common.selection import BestCheckpoint
from adaltm_downstream.harmonifuse.model import PromptAdaptiveFusion, TaskGate, TaskLayerWeights

TASKS = ("ser", "asr")


@dataclass
class FusionSettings:
    """`downstream_expert.fusion`. `variant`: `paper` (the published description, see model.py) or `extended`
    (ours); `prompt_dim` and `utterance_conditioned` apply to `extended` only."""
    variant: Literal["paper", "extended"] = "paper"
    prompt_dim: int = 64
    utterance_conditioned: bool = True     # extended: layer weights also depend on the utterance
    max_layers: int = 64
    schedule: list = field(default_factory=lambda: ["ser", "asr"])   # one batch of each, alternating

    def check(self, where: str) -> None:
        bad = [s for s in self.schedule if s not in TASKS]
        if not self.schedule or bad:
            raise settings.SettingsError(f"{where}.schedule: a list of ser/asr, got {self.schedule!r}")


def ser_fields(utt: Utterance) -> tuple:
    return ("ser", *emotion_fields(utt), None)


def asr_fields(utt: Utterance) -> tuple:
    return ("asr", None, None, utt.file, utt.transcript)


class DownstreamExpert(nn.Module):
    name = "harmonifuse"
    fuses_layers_itself = True

    def __init__(self, upstream_dim: int, upstream_rate: int, downstream_expert: dict, expdir: str, **kwargs):
        super().__init__()
        config = dict(downstream_expert)
        where = "downstream_expert"
        self.data = {task: settings.parse(DataSettings, config.pop(f"{task}_data", None), f"{where}.{task}_data")
                     for task in TASKS}
        self.fusion_settings = settings.parse(FusionSettings, config.pop("fusion", None), f"{where}.fusion")
        emotion = settings.parse(EmotionSettings, config.pop("emotion", None), f"{where}.emotion")
        asr = settings.parse(AsrSettings, config.pop("asr", None), f"{where}.asr")
        self.selection = BestCheckpoint(config.pop("selection", "loss"))
        if config:
            raise settings.SettingsError(f"{where}: unknown key(s) {', '.join(sorted(config))} (allowed: ser_data, "
                                         "asr_data, fusion, emotion, asr, selection)")
        self.expdir = Path(expdir)
        self.utterances = {task: self.data[task].load_splits(needs_transcripts=task == "asr") for task in TASKS}

        fusion = self.fusion_settings
        if fusion.variant == "paper":
            self.fusion = TaskLayerWeights(list(TASKS), fusion.max_layers)
            self.gates = None
        else:
            self.fusion = PromptAdaptiveFusion(list(TASKS), upstream_dim, fusion.prompt_dim,
                                               fusion.utterance_conditioned, fusion.max_layers)
            self.gates = nn.ModuleDict({t: TaskGate(upstream_dim, fusion.prompt_dim) for t in TASKS})
        self.emotion = EmotionTask(upstream_dim, emotion, self.utterances["ser"]["train"])
        vocabulary = Vocabulary.load_or_build(self.expdir / "vocab.json",
                                              [u.transcript for u in self.utterances["asr"]["train"]])
        self.asr = CTCTask(upstream_dim, asr, vocabulary)

    def _loader(self, task: str, split: str, epoch: int):
        utterances = self.utterances[task].get(split)
        if utterances is None:
            self.data[task].split_set(split)  # raises, naming the configured splits
        train = split == "train"
        if task == "ser":
            chosen = self.emotion.trainable(utterances) if train else self.emotion.evaluable(utterances)
            fields = ser_fields
        else:
            chosen, fields = [u for u in utterances if normalize_text(u.transcript or "")], asr_fields
        return make_loader(chosen, fields, self.data[task], train, epoch, f"{self.name} {task} {split}")

    def get_dataloader(self, split: str, epoch: int = 0):
        if split == "train":
            sources = {t: (lambda e, t=t: self._loader(t, "train", e)) for t in TASKS}
            return InterleavedLoader(sources, self.fusion_settings.schedule, epoch)
        return ChainedLoader([self._loader(t, split, epoch) for t in TASKS])

    def forward(self, split, features, tasks, targets, labels, files, transcripts, records, **kwargs):
        task = tasks[0]
        stacked = pad_sequence(features, batch_first=True)                              # (B, T, L, D)
        lengths = torch.tensor([len(f) for f in features], device=stacked.device)
        valid = torch.arange(stacked.shape[1], device=stacked.device)[None, :] < lengths[:, None]
        fused, weights = self.fusion(task, stacked, valid)
        records[f"{task}_layer_weights"].append(weights.detach().mean(0).cpu())
        if self.gates is not None:
            fused, gate = self.gates[task](fused, self.fusion.prompt(task))
            records[f"{task}_gate"].append(float(gate.detach()[valid].mean()))
        if task == "ser":
            return self.emotion(fused, valid, targets, labels, files, records)
        return self.asr(fused, valid, transcripts, files, records)

    def layer_weights(self, records) -> dict[str, list[float]]:
        return {t: torch.stack(records[f"{t}_layer_weights"]).mean(0).tolist()
                for t in TASKS if records.get(f"{t}_layer_weights")}

    def log_records(self, split, records, logger, global_step, batch_ids, total_batch_num, **kwargs):
        for task, weights in self.layer_weights(records).items():
            for layer, value in enumerate(weights):
                logger.add_scalar(f"{self.name}/{split}-{task}_layer_{layer:02d}", value, global_step=global_step)
        if split == "train":
            log_train_losses(self.name, records, logger, global_step)
            return []
        ser_set, asr_set = self.data["ser"].split_set(split), self.data["asr"].split_set(split)
        speakers = speakers_of(self.utterances["ser"])
        emotion = self.emotion.evaluate(records, ser_set, speakers)
        asr = self.asr.evaluate(records, asr_set)
        self.emotion.write(self.expdir, split, records, emotion, speakers)
        self.asr.write(self.expdir, split, records)
        metrics = {**emotion, **asr, "test_set": ser_set, "asr_test_set": asr_set, "emotion_loss": emotion["loss"],
                   "loss": (emotion["loss"] + asr["asr_loss"]) / 2, "layer_weights": self.layer_weights(records)}
        if self.gates is not None:
            metrics["gate_mean"] = {t: sum(records[f"{t}_gate"]) / len(records[f"{t}_gate"]) for t in TASKS}
        return finish_evaluation(self, split, metrics, logger, global_step)
