"""Shared constants with no heavy imports (the data stage imports these without torch)."""

#: Image file suffixes sdtune trains on and the data stage keeps.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})

#: data-juicer's multimodal markup in captions; removed wherever its rows are read, since they are
#: not words the model should learn.
DJ_TOKENS = ("<__dj__image>", "<|__dj__eoc|>")


def strip_dj_tokens(text: object) -> object:
    """``text`` without data-juicer's tokens (whitespace folded where one was); non-strings as they are."""
    if not isinstance(text, str) or not any(t in text for t in DJ_TOKENS):
        return text
    for token in DJ_TOKENS:
        text = text.replace(token, " ")
    return " ".join(text.split())

