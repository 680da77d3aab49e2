"""The `adaltm` command (`adaltm_cli.main`): parse the command line and dispatch; no logic of its own."""
