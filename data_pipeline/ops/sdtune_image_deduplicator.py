"""``sdtune_image_deduplicator``: a data-juicer Deduplicator for exact or near-duplicate images.

data-juicer's own ``image_deduplicator`` needs ``imagededup`` (and so torchvision); this one needs
only Pillow and numpy. It is registered in data-juicer's ``OPERATORS`` registry, so a recipe uses
it like any built-in op::

    - sdtune_image_deduplicator:
        method: dhash      # or sha256 (exact file bytes)
        max_distance: 4    # dhash only: differing bits still counted as the same image

The first occurrence in input order is kept. With the tracer open, ``process`` returns one
``[kept, dropped]`` pair per dropped sample (up to ``show_num``), so every drop can be reported as
"duplicate of <kept file>". The op holds only plain settings, so it pickles for ``np > 1``.
"""

from __future__ import annotations

from data_juicer.ops.base_op import OPERATORS, Deduplicator

from data_pipeline.ops.image_hash import METHODS, dhash_file, plan_duplicates, sha256_file

OP_NAME = "sdtune_image_deduplicator"
HASH_FIELD = "__sdtune_imagehash__"


@OPERATORS.register_module(module_name=OP_NAME, force=True)
class SdtuneImageDeduplicator(Deduplicator):
    """Drop samples whose image repeats an earlier one (exact bytes or difference hash)."""

    def __init__(self, method: str = "sha256", max_distance: int = 0, hash_size: int = 8, *args, **kwargs):
        """
        Initialization method.

        :param method: 'sha256' (byte-identical files) or 'dhash' (perceptual difference hash).
        :param max_distance: dhash only: largest Hamming distance still counted as a duplicate;
            0 means identical hashes.
        :param hash_size: dhash only: the hash has hash_size * hash_size bits.
        :param args: extra args
        :param kwargs: extra args
        """
        super().__init__(*args, **kwargs)
        if method not in METHODS:
            raise ValueError(f"{OP_NAME}: method {method!r} is not supported; use one of {list(METHODS)}.")
        if max_distance < 0 or (method == "sha256" and max_distance != 0):
            raise ValueError(f"{OP_NAME}: max_distance must be 0 for sha256 and >= 0 for dhash.")
        if hash_size < 2:
            raise ValueError(f"{OP_NAME}: hash_size must be at least 2.")
        self.method = method
        self.max_distance = int(max_distance)
        self.hash_size = int(hash_size)

    def _hash(self, path: str) -> str:
        return sha256_file(path) if self.method == "sha256" else dhash_file(path, self.hash_size)

    def compute_hash(self, sample, context=False):
        """Store the image fingerprint in ``HASH_FIELD`` ("" when there is no readable image)."""
        paths = sample.get(self.image_key) or []
        try:
            sample[HASH_FIELD] = ",".join(self._hash(p) for p in paths)
        except Exception:  # an unreadable image is not a duplicate of anything
            sample[HASH_FIELD] = ""
        return sample

    def process(self, dataset, show_num=0):
        """Keep first occurrences; return the dataset and ``{id: [kept sample, dropped sample]}``."""
        dup_pairs = {}
        if len(dataset) > 1:
            plan = plan_duplicates(list(dataset[HASH_FIELD]), self.max_distance)
            for dropped in sorted(plan)[: max(0, show_num)]:
                kept, distance = plan[dropped]
                pair = [dict(dataset[kept]), dict(dataset[dropped])]
                pair[1]["__sdtune_distance__"] = distance
                dup_pairs[dropped] = pair
            if plan:
                dataset = dataset.select([i for i in range(len(dataset)) if i not in plan])
        if HASH_FIELD in dataset.column_names:
            dataset = dataset.remove_columns([HASH_FIELD])
        return dataset, dup_pairs
