"""The errors and the report of a conversion: what happened to every key."""

import logging
from dataclasses import dataclass, field
from typing import List, Tuple

logger = logging.getLogger("gfocalv2.convert")


class ConversionError(ValueError):
    """A source that cannot be converted (shape mismatch, unknown keys when strict, wrong arch)."""


@dataclass
class ConversionReport:
    """What happened to every key.

    converted: (source key, target key) pairs.
    dropped: (source key, reason) for source keys deliberately not converted.
    unmatched: source keys no rule understands.
    missing: target model keys no source key filled (optional buffers excluded).
    unexpected: converted keys that the target model does not have.
    notes: other messages (e.g. the classifier's dropped background channel).
    """

    converted: List[Tuple[str, str]] = field(default_factory=list)
    dropped: List[Tuple[str, str]] = field(default_factory=list)
    unmatched: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def log(self, log=logger):
        log.info("converted %d tensors", len(self.converted))
        for src, reason in self.dropped:
            log.info("dropped %s: %s", src, reason)
        for note in self.notes:
            log.info("%s", note)
        for k in self.unmatched:
            log.warning("source key not converted (no rule matches it): %s", k)
        for k in self.unexpected:
            log.warning("converted key not in the target model: %s", k)
        for k in self.missing:
            log.warning("target model key not filled by the source: %s", k)

    @property
    def problems(self) -> List[str]:
        return (
            [f"unmatched source key {k}" for k in self.unmatched]
            + [f"converted key {k} not in the target model" for k in self.unexpected]
            + [f"target model key {k} not filled" for k in self.missing]
        )
