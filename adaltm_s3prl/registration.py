"""Make s3prl find the plugin: upstream names in `s3prl.hub`, downstream packages in `s3prl.downstream`,
optimizers in `s3prl.optimizers`. s3prl has no entry-point mechanism, so the launcher calls `register()`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import adaltm_downstream
from adaltm_s3prl import precision
from adaltm_s3prl.arguments import check_config, known_arguments

DOWNSTREAM_DIR = Path(adaltm_downstream.__file__).resolve().parent


def packaged_config(downstream: str) -> Path | None:
    path = DOWNSTREAM_DIR / downstream / "config.yaml"
    return path if path.is_file() else None


def register() -> None:
    import s3prl.downstream
    import s3prl.hub
    import s3prl.optimizers
    from s3prl import run_downstream
    from s3prl.downstream.runner import Runner

    from adaltm_s3prl.optimizers import S3PRL_OPTIMIZERS
    from adaltm_upstream.hubconf import adaltm_wavlm

    s3prl.hub.adaltm_wavlm = adaltm_wavlm
    for name, factory in S3PRL_OPTIMIZERS.items():
        setattr(s3prl.optimizers, f"get_{name}", factory)
    if str(DOWNSTREAM_DIR) not in s3prl.downstream.__path__:
        s3prl.downstream.__path__.append(str(DOWNSTREAM_DIR))
    if not getattr(Runner._get_upstream, "_adaltm_hook", False):
        Runner.__init__ = _with_precision(Runner.__init__)
        Runner._get_upstream = _attach_experiment(Runner._get_upstream)
        Runner._get_featurizer = _layer_stack_when_asked(Runner._get_featurizer)
        run_downstream.get_downstream_args = _checked_config(run_downstream.get_downstream_args)


def _checked_config(get_downstream_args):
    """The run's config (the `-c` file, or the `-e` checkpoint's, after `-o`) checked before any model loads; a
    `-e` run writes where `-p` says (s3prl would take the checkpoint's recorded directory over `-p`)."""

    def wrapped():
        args, config, backup_files = get_downstream_args()
        check_config(config, args.past_exp or args.config or "config", args.device)
        asked = known_arguments(sys.argv[1:]).expdir if args.past_exp else None  # s3prl applies -o args.expdir
        if asked:
            args.expdir = asked
            os.makedirs(asked, exist_ok=True)
        return args, config, backup_files

    return wrapped


def _with_precision(init):
    """Once s3prl's Runner built upstream, featurizer and downstream: run them in `runner.precision`."""

    def wrapped(runner, args, config):
        init(runner, args, config)
        precision.apply(runner)

    return wrapped


def _attach_experiment(get_upstream):
    """Tell an upstream that asks for it (`attach_experiment`) where the run writes, so it can log there."""

    def wrapped(runner):
        entry = get_upstream(runner)
        model = getattr(entry.model, "module", entry.model)
        if hasattr(model, "attach_experiment"):
            model.attach_experiment(runner.args.expdir)
        return entry

    wrapped._adaltm_hook = True
    return wrapped


def _layer_stack_when_asked(get_featurizer):
    """Downstreams that fuse layers themselves (`fuses_layers_itself = True`) get every hidden state instead of
    s3prl's weighted sum; the plugin's downstreams (`counts_cnn_frames = True`) get each utterance's own frames
    (`frames`)."""

    def wrapped(runner):
        import importlib

        from adaltm_s3prl import frames
        from adaltm_s3prl.layer_stack import LayerStack

        expert = importlib.import_module(f"s3prl.downstream.{runner.args.downstream}.expert")
        if not getattr(expert.DownstreamExpert, "fuses_layers_itself", False):
            entry = get_featurizer(runner)
            upstream = getattr(runner.upstream.model, "module", runner.upstream.model)
            layers = frames.conv_stack(upstream)
            if layers and getattr(expert.DownstreamExpert, "counts_cnn_frames", False):
                getattr(entry.model, "module", entry.model).tolist = frames.trimmer(layers)
            return entry
        model = LayerStack(runner.upstream.model, runner.args.upstream_feature_selection, runner.args.device)
        return runner._init_model(model=model.to(runner.args.device), name="Featurizer", trainable=True,
                                  interfaces=["output_dim", "downsample_rate"])

    return wrapped
