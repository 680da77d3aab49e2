"""`-d msp_podcast_asr`: character CTC ASR on MSP-Podcast's own transcripts (the in-domain ASR task vector).

In: utterances with a transcript -> batches `(wavs, transcripts, files)`. Transformed: features -> projection
(-> BiLSTM) -> characters, CTC loss, greedy decoding. Out: `{split}_transcripts.tsv` (normalised ref/hyp) and
`{split}_metrics.json` with `wer`/`cer` from jiwer; the vocabulary is `vocab.json` in the experiment directory.
With `-f` the whole upstream is fine-tuned and its `states-*.ckpt` is a `--finetuned` source for
`adaltm task-vector extract`.
"""

from __future__ import annotations

from adaltm_downstream.common.corpus import Utterance
from adaltm_downstream.common.ctc import AsrSettings, CTCTask, Vocabulary, normalize_text
from adaltm_downstream.common.expert import CorpusExpert
from adaltm_downstream.common.heads import pad_features
from adaltm_downstream.common.selection import ASR_METRICS


class DownstreamExpert(CorpusExpert):
    name = "msp_podcast_asr"
    sections = {"asr": AsrSettings}
    default_selection = "loss"
    selectable = ASR_METRICS
    needs_transcripts = True

    def build(self, upstream_dim: int) -> None:
        vocabulary = Vocabulary.load_or_build(self.expdir / "vocab.json",
                                              [u.transcript for u in self.utterances["train"]])
        self.asr = CTCTask(upstream_dim, self.settings["asr"], vocabulary)

    def select(self, utterances: list[Utterance], train: bool) -> list[Utterance]:
        return [u for u in utterances if normalize_text(u.transcript or "")]

    def fields(self, utt: Utterance) -> tuple:
        return utt.transcript, utt.file

    def forward(self, split, features, transcripts, files, records, **kwargs):
        padded, valid = pad_features(features)
        return self.asr(padded, valid, transcripts, files, records)

    def evaluate(self, split: str, records, test_set: str) -> dict:
        metrics = self.asr.evaluate(records, test_set)
        self.asr.write(self.expdir, split, records)
        return {**metrics, "loss": metrics["asr_loss"], "n": metrics["asr_n"]}

    def describe(self, padded, valid) -> list[str]:
        return self.asr.describe(padded, valid)
