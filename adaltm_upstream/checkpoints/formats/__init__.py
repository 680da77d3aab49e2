"""One reader per checkpoint format, each `read(path, content) -> Checkpoint` over already-loaded content;
`adaltm_upstream.checkpoints.load_checkpoint` recognises the format from the content and calls the reader."""
