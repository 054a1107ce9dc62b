"""Judge functions the eval tests load as `tiny_judges:NAME` (this folder is on sys.path
under pytest)."""


def word_count_score(prompt: str, completion: str) -> float:
    """Pointwise: fewer words is better."""
    return -len(completion.split())


def longer_wins(prompt: str, candidate: str, reference: str) -> float:
    """Pairwise: the longer text wins; equal lengths tie."""
    return 1.0 if len(candidate) > len(reference) else 0.0 if len(candidate) < len(reference) else 0.5
