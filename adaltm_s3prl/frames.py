"""Each utterance's own frames, whatever it is batched with.

s3prl's featurizer keeps round(samples / 320) frames of every utterance in a batch. WavLM's CNN (kernel 400, hop
320 overall) makes floor((samples − 400) / 320) + 1, one fewer whenever samples mod 320 is below 80 or above 160:
alone, the utterance simply has fewer frames; batched with a longer one, the extra frame is computed from the
padding, and a head's mean pooling counted it — a prediction depended on what the utterance was batched with
(by up to 1e-3 in probability on the test models, enough to flip near ties). For the plugin's downstreams
(`counts_cnn_frames = True`) the launcher's featurizer keeps exactly the frames the upstream's CNN made, the count
transformers' models use for their attention masks. Stock downstreams keep s3prl's rule: their labels may be
aligned to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def conv_stack(upstream: nn.Module) -> list[tuple[int, int]] | None:
    """(kernel, stride) of each 1-D convolution of the upstream's waveform CNN (its `feature_extractor`: s3prl's
    and transformers' wav2vec 2.0 family alike), in order; None where the upstream has no such CNN."""
    for name, module in upstream.named_modules():
        if name.split(".")[-1] == "feature_extractor":
            layers = [(m.kernel_size[0], m.stride[0]) for m in module.modules() if isinstance(m, nn.Conv1d)]
            if layers:
                return layers
    return None


def frame_counts(layers: Sequence[tuple[int, int]], samples: Sequence[int]) -> list[int]:
    """Frames the CNN makes from each number of samples (no padding, no dilation: floor((n − k) / s) + 1 a layer)."""
    counts = []
    for n in samples:
        for kernel, stride in layers:
            n = max(0, (n - kernel) // stride + 1)
        counts.append(n)
    return counts


def trimmer(layers: Sequence[tuple[int, int]]) -> Callable[[list[torch.Tensor], torch.Tensor], list[torch.Tensor]]:
    """A replacement for s3prl's `Featurizer.tolist(paired_wavs, paired_feature)` that cuts each utterance's
    features to its CNN frame count (never longer than s3prl's own cut)."""

    def tolist(paired_wavs: list[torch.Tensor], paired_feature: torch.Tensor) -> list[torch.Tensor]:
        counts = frame_counts(layers, [len(wav) for wav in paired_wavs])
        return [feature[:count] for feature, count in zip(paired_feature, counts)]

    return tolist
