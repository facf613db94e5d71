"""The data-juicer cleaning stage (`make data`); implemented in its own issue."""
