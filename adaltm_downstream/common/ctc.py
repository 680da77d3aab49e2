"""Character CTC ASR as a component: text normalisation, vocabulary, head, greedy decoding, WER/CER (jiwer).

Normalisation, applied to references and hypotheses alike: Unicode NFKC, lower case, every character that is
not a letter, digit, apostrophe or space removed (punctuation, brackets, tags like [laughter] lose their
brackets), whitespace collapsed.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import jiwer
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adaltm_core.files import atomic_write_text
from adaltm_downstream.common import reports

BLANK = "<blank>"


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w' ]|_", " ", text)
    return re.sub(r"\s+", " ", text).strip()


class Vocabulary:
    """Index 0 is the CTC blank; then every character of the normalised training transcripts, sorted."""

    def __init__(self, symbols: list[str]):
        if not symbols or symbols[0] != BLANK:
            raise ValueError("the first symbol must be the blank")
        self.symbols = list(symbols)
        self.index = {s: i for i, s in enumerate(self.symbols)}

    @classmethod
    def from_texts(cls, texts: list[str]) -> Vocabulary:
        return cls([BLANK] + sorted({c for t in texts for c in normalize_text(t)}))

    @classmethod
    def load_or_build(cls, path: Path, texts: list[str]) -> Vocabulary:
        """The experiment's saved vocabulary when there is one (resume, evaluation), else a new one saved there."""
        if path.is_file():
            return cls(json.loads(path.read_text())["symbols"])
        vocabulary = cls.from_texts(texts)
        atomic_write_text(path, json.dumps({"symbols": vocabulary.symbols, "normalisation": __doc__.strip()}))
        return vocabulary

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in normalize_text(text) if c in self.index]

    def decode(self, ids) -> str:
        return "".join(self.symbols[i] for i in ids if i != 0)

    def greedy(self, frame_ids: list[int]) -> str:
        """CTC best path: collapse repeats, then drop blanks."""
        collapsed = [i for k, i in enumerate(frame_ids) if k == 0 or i != frame_ids[k - 1]]
        return re.sub(r"\s+", " ", self.decode(collapsed)).strip()


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus-level WER and CER with jiwer, on normalised text (empty references are not scored)."""
    pairs = [(r, h) for r, h in zip(references, hypotheses) if r]
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps))}


@dataclass
class AsrSettings:
    """`downstream_expert.asr`."""
    projector_dim: int = field(default=256, metadata={"min": 1})
    # 0: a linear CTC head (the usual one when fine-tuning the upstream)
    lstm_layers: int = field(default=0, metadata={"min": 0})
    dropout: float = field(default=0.1, metadata={"min": 0, "max": 0.99})


class CTCTask(nn.Module):
    def __init__(self, input_dim: int, settings: AsrSettings, vocabulary: Vocabulary):
        super().__init__()
        self.vocabulary = vocabulary
        self.projector = nn.Linear(input_dim, settings.projector_dim)
        self.lstm = (nn.LSTM(settings.projector_dim, settings.projector_dim // 2, settings.lstm_layers,
                             batch_first=True, bidirectional=True, dropout=settings.dropout if settings.lstm_layers > 1
                             else 0.0) if settings.lstm_layers else None)
        self.dropout = nn.Dropout(settings.dropout)
        self.output = nn.Linear(settings.projector_dim, len(vocabulary))

    def log_probs(self, padded: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(torch.relu(self.projector(padded)))
        if self.lstm is not None:
            hidden, _ = self.lstm(hidden)
        return F.log_softmax(self.output(hidden).float(), dim=-1)

    def describe(self, padded: torch.Tensor, valid: torch.Tensor) -> list[str]:
        """Greedy transcripts, per utterance."""
        best = self.log_probs(padded).argmax(dim=-1).cpu()
        return [self.vocabulary.greedy(best[i, : int(n)].tolist()) for i, n in enumerate(valid.sum(dim=1))]

    def forward(self, padded: torch.Tensor, valid: torch.Tensor, transcripts, files, records) -> torch.Tensor:
        log_probs = self.log_probs(padded)
        lengths = valid.sum(dim=1)
        targets = [torch.tensor(self.vocabulary.encode(t), dtype=torch.long) for t in transcripts]
        target_lengths = torch.tensor([len(t) for t in targets])
        per_utterance = F.ctc_loss(log_probs.transpose(0, 1), torch.cat(targets).to(padded.device), lengths.cpu(),
                                   target_lengths, blank=0, reduction="none", zero_infinity=True)
        per_utterance = per_utterance / target_lengths.clamp(min=1).to(per_utterance.device)
        records["asr_loss"] += per_utterance.detach().cpu().tolist()
        best = log_probs.detach().argmax(dim=-1).cpu()
        records["hypotheses"] += [self.vocabulary.greedy(best[i, : int(n)].tolist()) for i, n in enumerate(lengths)]
        records["references"] += [normalize_text(t) for t in transcripts]
        records["asr_files"] += list(files)
        return per_utterance.mean()

    @staticmethod
    def evaluate(records, test_set: str) -> dict:
        return {**error_rates(records["references"], records["hypotheses"]),
                "asr_loss": float(np.mean(records["asr_loss"])), "asr_n": len(records["references"]),
                "test_set": test_set}

    @staticmethod
    def write(expdir: Path, split: str, records) -> None:
        reports.write_transcripts(expdir / f"{split}_transcripts.tsv", records["asr_files"], records["references"],
                                  records["hypotheses"])
