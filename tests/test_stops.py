"""StopMatcher: stop strings split across pieces, held-back text released at the end."""

from llmserve.chat.stops import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces) + m.flush()
    return out, m.stopped


def test_no_stops_passes_through() -> None:
    assert run([], ["a", "b"]) == ("ab", False)


def test_stop_split_across_pieces() -> None:
    assert run(["END"], ["xx E", "N", "D yy"]) == ("xx ", True)


def test_partial_match_released_when_it_diverges() -> None:
    m = StopMatcher(["END"])
    assert m.feed("a E") == "a "
    assert m.feed("X") == "EX"


def test_held_text_flushed_at_end() -> None:
    assert run(["END"], ["abc E", "N"]) == ("abc EN", False)


def test_earliest_of_several_stops() -> None:
    assert run(["bb", "a"], ["xbba"]) == ("x", True)


def test_nothing_after_stop() -> None:
    m = StopMatcher(["!"])
    assert m.feed("hi!") == "hi"
    assert m.feed("more") == ""


def test_matched_names_the_earliest_stop() -> None:
    m = StopMatcher(["world", "lo w"])
    assert m.matched is None
    assert m.feed("hello world") == "hel"
    assert m.matched == "lo w"
