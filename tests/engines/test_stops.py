import random

from hypothesis import given
from hypothesis import strategies as st

from meshnode.engines.stops import StopMatcher


def run(pieces: list[str], stops: tuple[str, ...]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        text, hit = m.feed(p)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + m.flush(), False


def test_stop_across_pieces_is_never_partly_sent() -> None:
    m = StopMatcher(("END",))
    assert m.feed("abc E") == ("abc ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("D more") == ("", True)


def test_false_start_is_released() -> None:
    assert run(["E", "Nx", "y"], ("END",)) == ("ENxy", False)


def test_earliest_stop_wins() -> None:
    assert run(["a b c"], ("c", "b")) == ("a ", True)


@given(st.text(alphabet="abE ND", max_size=40), st.lists(st.integers(1, 5), max_size=20),
       st.sampled_from([("END",), ("N",), ("a b", "DD"), ()]))
def test_matches_whole_text_search(text: str, cuts: list[int], stops: tuple[str, ...]) -> None:
    pieces, i = [], 0
    for c in cuts + [len(text)]:
        pieces.append(text[i:i + c])
        i += c
    pieces.append(text[i:])
    hits = [text.find(s) for s in stops if s in text]
    expected = (text[:min(hits)], True) if hits else (text, False)
    assert run(pieces, stops) == expected


def test_random_streams() -> None:
    seed = random.randrange(2**32)
    print("seed", seed)
    rng = random.Random(seed)
    for _ in range(200):
        text = "".join(rng.choice("xyz\n") for _ in range(rng.randrange(30)))
        stop = "".join(rng.choice("xyz\n") for _ in range(rng.randrange(1, 4)))
        cut = sorted(rng.sample(range(len(text) + 1), k=min(3, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0] + cut, cut + [len(text)])]
        expected = (text[:text.find(stop)], True) if stop in text else (text, False)
        assert run(pieces, (stop,)) == expected
