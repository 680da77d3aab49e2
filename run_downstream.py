"""s3prl's `run_downstream.py`, working on the modern stack and knowing the AdaLTM plugin.

Same flags as s3prl's; see `adaltm_s3prl/launcher.py` for what is added before s3prl takes over.
"""

from adaltm_s3prl.launcher import main

if __name__ == "__main__":
    main()
