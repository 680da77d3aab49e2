"""The one place that knows s3prl: its compatibility fixes (`compat`), the plugin's registration in s3prl's hub,
downstream path and optimizer lookup (`registration`), the launcher behind `run_downstream.py`, the optimizer s3prl
looks up by name, and the featurizer hook for downstreams that fuse layers themselves."""
