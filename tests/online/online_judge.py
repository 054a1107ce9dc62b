"""`module:function` judges for the online tests."""


def score(prompt: str, completion: str) -> float:
    """The share of the completion's characters that are printable ASCII (0 when empty):
    a random tiny model scores around the default threshold 0.5, and can learn to pass."""
    if not completion:
        return 0.0
    return sum(32 <= ord(ch) < 127 for ch in completion) / len(completion)


def compare(prompt: str, candidate: str, reference: str) -> float:
    """A pairwise function: refused by online rounds (nothing to compare a lone sample with)."""
    return 0.5
