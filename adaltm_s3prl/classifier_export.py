"""A finished emotion run as a transformers audio classifier: `adaltm export --format hf-classifier`.

In: the states of an `msp_podcast_cat` (or `msp_podcast_mtl`) run — `dev-best.ckpt`, or the run directory — whose
upstream was `adaltm_wavlm` or s3prl's `wavlm_local`. Out: a directory that the stock
`WavLMForSequenceClassification`, `AutoModelForAudioClassification` and `pipeline("audio-classification")` load,
giving for each file the probabilities `run_downstream.py -m evaluate` gives it (tested within 1e-4): the merged
WavLM weights from `adaltm_upstream.export` (λ folded in; a `wavlm_local` run's own weights), s3prl's featurizer
weights as `layer_weights`, the head's projector and classifier, the 8 classes in the corpus order.

How s3prl's computation maps onto the stock class (the shape of the SUPERB ER conversions on the Hub):
- s3prl's hidden states are transformers' `hidden_states`, but for pre-LN WavLM (Large) s3prl's last one is the
  encoder output after the final LayerNorm while transformers 5 records the last layer's output before it.
  `tie_last_hidden_states: true` in config.json (honoured since transformers 5.18; 4.x always did this) makes
  transformers hand over s3prl's state, so no custom code is needed.
- States the featurizer did not see (`hidden_states: transformer` drops the first; `-l`/`-s` keep one) get the
  weight −inf: softmax gives them exactly 0.
- s3prl normalises a waveform with `F.layer_norm` (eps 1e-5), the feature extractor with eps 1e-7; WavLM's first
  convolution has no bias and is followed by a normalisation, so the scale difference cancels (measured: 1e-5 at
  −70 dBFS). A first convolution with a bias would not cancel it and is refused.
Refused, each with the reason: a head with a hidden layer, `--upstream_feature_normalize`, and evaluation-time
waveform changes a pipeline cannot know (`datarc.max_seconds`, `datarc.normalise`).

The backbone is written by `adaltm_upstream.export` (streamed, one layer group at a time); its safetensors bytes
are copied under the `wavlm.` prefix with only the header rewritten, so no step holds a copy of the weights.
"""

from __future__ import annotations

import json
import math
import shutil
from argparse import Namespace
from pathlib import Path

import torch
import yaml
from transformers import WavLMConfig

from adaltm_core.errors import UserError
from adaltm_core.files import atomic_directory
from adaltm_core.safe_load import torch_load
from adaltm_downstream.common.corpus import CLASS_NAMES, CLASSES
from adaltm_downstream.common.emotion import head_from_states
from adaltm_downstream.common.heads import UtteranceClassifier
from adaltm_upstream import config as upstream_config
from adaltm_upstream.export import PROVENANCE, export

DOWNSTREAMS = ("msp_podcast_cat", "msp_podcast_mtl")
UPSTREAMS = ("adaltm_wavlm", "wavlm_local")
ARCHITECTURE = "WavLMForSequenceClassification"


def find_states(path: str | Path) -> Path:
    """A run directory means its `dev-best.ckpt`; a file is taken as it is."""
    path = Path(path)
    if path.is_dir():
        best = path / "dev-best.ckpt"
        if not best.is_file():
            raise UserError(f"{path}: no dev-best.ckpt in this run directory (has the run evaluated dev yet?); "
                            "pass --states EXPDIR/states-N.ckpt")
        return best
    return path


def export_classifier(states: str | Path, output: str | Path, config: str | None = None) -> Path:
    """Write the classifier directory `output` (atomically) from a run's states; `config`: the run's `-g`, read
    from its arguments when not given (adaltm_wavlm runs only)."""
    states_path = find_states(states)
    run = torch_load(states_path, mmap=True)
    args = run.get("Args") if isinstance(run, dict) else None
    if not isinstance(args, Namespace) or not isinstance(run.get("Downstream"), dict):
        raise UserError(f"{states_path}: not the states of an s3prl run (EXPDIR/dev-best.ckpt)")
    if args.downstream not in DOWNSTREAMS:
        raise UserError(f"{states_path}: a {args.downstream} run; only {' and '.join(DOWNSTREAMS)} runs have the "
                        "emotion head this export writes")
    if args.upstream not in UPSTREAMS:
        raise UserError(f"{states_path}: upstream {args.upstream}; only {' and '.join(UPSTREAMS)} runs can be "
                        "exported as a WavLM classifier")
    if config is not None and args.upstream != "adaltm_wavlm":
        raise UserError(f"-g {config}: a {args.upstream} run has no adaltm_wavlm config")
    head = head_from_states(run["Downstream"], str(states_path))
    _check_representable(states_path, args, run.get("Config") or {}, head)
    output = Path(output)
    with atomic_directory(output) as tmp:
        backbone, hidden, provenance = _export_backbone(states_path, args, "Upstream" in run, config,
                                                        tmp / "backbone")
        wavlm = WavLMConfig.from_pretrained(backbone)
        if wavlm.conv_bias and json.loads((backbone / "preprocessor_config.json").read_text())["do_normalize"]:
            raise UserError(f"{states_path}: the base normalises each waveform (eps 1e-5 in s3prl, 1e-7 in "
                            "transformers' feature extractor) and its first convolution has a bias, so the difference "
                            "would not cancel: no exact stock classifier exists for it")
        weights = layer_weights(args, run.get("Featurizer") or {}, hidden, wavlm.num_hidden_layers, states_path)
        _classifier_config(wavlm, head).to_json_file(tmp / "config.json")
        tensors = {"layer_weights": weights, "projector.weight": head.projector.weight,
                   "projector.bias": head.projector.bias, "classifier.weight": head.classifier[0].weight,
                   "classifier.bias": head.classifier[0].bias}
        _prefixed_safetensors(backbone / "model.safetensors", tmp / "model.safetensors", "wavlm.", tensors)
        shutil.copy(backbone / "preprocessor_config.json", tmp / "preprocessor_config.json")
        provenance["classifier"] = {"states": str(states_path), "downstream": args.downstream,
                                    "upstream": args.upstream, "hidden_states": hidden,
                                    "feature_selection": args.upstream_feature_selection,
                                    "layer_selection": args.upstream_layer_selection,
                                    "layer_weights_softmax": weights.softmax(dim=-1).tolist(),
                                    "classes": list(CLASSES)}
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=1))
        shutil.rmtree(backbone)
    return output


def _check_representable(states_path: Path, args: Namespace, run_config: dict, head: UtteranceClassifier) -> None:
    """What `WavLMForSequenceClassification` (weighted sum, projector, mean pooling, one linear layer) cannot do."""
    if len(head.classifier) > 1:
        raise UserError(f"{states_path}: the head has a hidden layer (downstream_expert.emotion.hidden_dim > 0); "
                        f"{ARCHITECTURE} has one linear classifier after the projector, so it cannot be exported")
    if getattr(args, "upstream_feature_normalize", False):
        raise UserError(f"{states_path}: the run used --upstream_feature_normalize (a layer norm of every hidden "
                        f"state before the weighted sum), which {ARCHITECTURE} does not have")
    datarc = (run_config.get("downstream_expert") or {}).get("datarc") or {}
    if datarc.get("max_seconds") is not None:
        raise UserError(f"{states_path}: the run scores only the first {datarc['max_seconds']} s of each file "
                        "(downstream_expert.datarc.max_seconds); a transformers classifier sees the whole file")
    if datarc.get("normalise", "none") != "none":
        raise UserError(f"{states_path}: the run standardises waveforms with the training set's statistics "
                        f"(downstream_expert.datarc.normalise: {datarc['normalise']}), which transformers' feature "
                        "extractor cannot do")


def _export_backbone(states_path: Path, args: Namespace, has_upstream: bool, config: str | None,
                     out: Path) -> tuple[Path, str, dict]:
    """The run's WavLM as a `WavLMModel` directory through `adaltm export --format hf`; returns it, the run's
    `hidden_states` convention and the export's provenance (naming the run's own config). `has_upstream`: the
    states hold the upstream's own state (it trained)."""
    if args.upstream == "adaltm_wavlm":
        config = config or args.upstream_model_config
        if not config or not Path(config).is_file():
            raise UserError(f"{states_path}: the run's -g config {config!r} is not found from here (a relative path "
                            "is taken from where the run started); pass -g")
        parsed = upstream_config.load(config, base_override=args.upstream_ckpt)
        data = dict(upstream_config.read_yaml(config) or {})
        data.update(base=parsed.base, task_vectors=dict(parsed.task_vectors))  # absolute, -k applied
        hidden = parsed.hidden_states
    else:  # wavlm_local: its fine-tuned weights (-f) or its -k checkpoint, as a static merge without vectors
        base = states_path if has_upstream else args.upstream_ckpt
        if not base or not Path(base).is_file():
            raise UserError(f"{states_path}: the run's -k checkpoint {base!r} is not found (a frozen wavlm_local "
                            "run keeps no weights of its own)")
        data = {"base": str(Path(base).resolve()), "merge": {"granularity": "static"}}
        hidden, config = "all", None
    resolved = out.parent / "upstream.yaml"
    resolved.write_text(yaml.safe_dump(data, sort_keys=False))
    export(str(resolved), str(states_path) if args.upstream == "adaltm_wavlm" else None, out, "hf")
    resolved.unlink()
    provenance = json.loads((out / PROVENANCE).read_text())
    provenance["config"] = str(config) if config else None
    return out, hidden, provenance


def layer_weights(args: Namespace, featurizer: dict, hidden: str, num_layers: int, source: Path) -> torch.Tensor:
    """s3prl's featurizer as `layer_weights` over transformers' L + 1 hidden states (softmax-normalised like
    s3prl's), −inf where a state does not count. With `hidden == "transformer"` the featurizer saw states 1 … L."""
    seen = list(range(1 if hidden == "transformer" else 0, num_layers + 1))
    selection = args.upstream_feature_selection or "hidden_states"
    chosen = None
    if selection == "last_hidden_state":
        chosen = seen[-1]
    elif selection.startswith("hidden_state_") and selection[len("hidden_state_"):].isdigit():
        index = int(selection[len("hidden_state_"):])
        if index >= len(seen):
            raise UserError(f"{source}: -s {selection}: the upstream has {len(seen)} hidden states")
        chosen = seen[index]
    elif args.upstream_layer_selection is not None:  # any other key: s3prl falls back to hidden_states
        try:
            chosen = seen[args.upstream_layer_selection]
        except IndexError:
            raise UserError(f"{source}: -l {args.upstream_layer_selection}: the upstream has {len(seen)} hidden "
                            "states") from None
    weights = torch.full((num_layers + 1,), -math.inf)
    if chosen is not None:
        weights[chosen] = 0.0
        return weights
    learned = featurizer.get("weights")
    if not isinstance(learned, torch.Tensor) or learned.shape != (len(seen),):
        found = "none" if not isinstance(learned, torch.Tensor) else len(learned)
        raise UserError(f"{source}: the featurizer's weights (Featurizer.weights: {found}) do not match the "
                        f"{len(seen)} hidden states of this upstream (hidden_states: {hidden})")
    if not torch.isfinite(learned).all():
        raise UserError(f"{source}: the featurizer's weights are not finite (a diverged run); export another "
                        "checkpoint")
    weights[seen] = learned.detach().float()
    return weights


def _classifier_config(wavlm: WavLMConfig, head: UtteranceClassifier) -> WavLMConfig:
    config = WavLMConfig(**{**wavlm.to_dict(), "architectures": [ARCHITECTURE]})
    config.use_weighted_layer_sum = True
    config.classifier_proj_size = head.projector.out_features
    config.id2label = dict(enumerate(CLASS_NAMES))
    config.label2id = {name: index for index, name in enumerate(CLASS_NAMES)}
    config.tie_last_hidden_states = True   # hidden_states[-1] = the encoder output, after a final LayerNorm
    return config


def _prefixed_safetensors(source: Path, target: Path, prefix: str, extra: dict[str, torch.Tensor]) -> None:
    """`source`'s tensors renamed `prefix + name`, then `extra` (fp32): the header is rewritten, the data bytes are
    copied as they are (safetensors: 8-byte little-endian header length, JSON header of byte ranges, the data)."""
    with open(source, "rb") as src:
        header = json.loads(src.read(int.from_bytes(src.read(8), "little")))
        metadata = header.pop("__metadata__", None)
        renamed = {prefix + name: entry for name, entry in header.items()}
        end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        blobs = []
        for name, tensor in extra.items():
            blob = tensor.detach().to(torch.float32).contiguous().numpy().tobytes()
            renamed[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [end, end + len(blob)]}
            end += len(blob)
            blobs.append(blob)
        if metadata is not None:
            renamed["__metadata__"] = metadata
        encoded = json.dumps(renamed, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(target, "wb") as dst:
            dst.write(len(encoded).to_bytes(8, "little"))
            dst.write(encoded)
            shutil.copyfileobj(src, dst, 1 << 24)
            for blob in blobs:
                dst.write(blob)
