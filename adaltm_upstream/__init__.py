"""AdaLTM upstream side: checkpoints, backbone, task vectors, merging and the s3prl upstream `adaltm_wavlm`."""

from adaltm_upstream.hubconf import adaltm_wavlm

__all__ = ["adaltm_wavlm"]
