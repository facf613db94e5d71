"""``python -m sdtune.ui``: a local web app for the whole loop (start runs from presets, watch loss and
samples, stop, resume, compare, browse and caption datasets), over the same commands and run folders
as the command line. The layer above the commands: it may import any of sdtune, nothing imports it."""
