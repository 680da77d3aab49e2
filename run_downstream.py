"""s3prl's `run_downstream.py`, working on the modern stack and knowing the AdaLTM plugin.

Same flags as s3prl's; see `adaltm_upstream/launcher.py` for what is added before s3prl takes over.
"""

from adaltm_upstream.launcher import main

if __name__ == "__main__":
    main()
