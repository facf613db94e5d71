"""One run's life on disk: the run folder and its lock, resume, graceful stop, progress, loggers and
the callbacks that write the LoRA, the plots and the summary.
"""
