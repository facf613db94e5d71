"""Using LoRAs: loading weighted LoRA files onto a base model, rendering prompts, and the input
pictures of img2img and ControlNet.
"""
