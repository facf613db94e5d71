"""What one training run does: the LightningModule, the diffusion maths of a step, what trains
(LoRA, text encoders, embeddings), optimizers, EMA, guards, speed switches, caches and checkpoints.
"""
