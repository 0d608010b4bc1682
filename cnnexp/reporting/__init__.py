"""Report stage: statistics (`stats`), plain-word answers (`answers`), plots and the written report
(`write`); `python -m cnnexp.report <study>` is the CLI (`__main__`)."""
