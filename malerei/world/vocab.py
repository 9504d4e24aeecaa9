"""The shapes world's vocabulary, exactly as ../shared/SHAPES.md fixes it (all numbers at 64 px)."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 50),
    "green": (50, 170, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 180),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 10.0, "large": 20.0}  # extent in px at 64
SIZE_JITTER = 0.10  # each extent jittered by up to 10 %
POSITION_JITTER = 2.0  # px at 64, each axis
CELL_CENTRES: tuple[float, ...] = (14.0, 32.0, 50.0)  # px at 64

# caption words -> (column, row)
POSITIONS: dict[str, tuple[int, int]] = {
    "in the top left": (0, 0),
    "at the top": (1, 0),
    "in the top right": (2, 0),
    "on the left": (0, 1),
    "in the center": (1, 1),
    "on the right": (2, 1),
    "in the bottom left": (0, 2),
    "at the bottom": (1, 2),
    "in the bottom right": (2, 2),
}
CELL_TO_POSITION: dict[tuple[int, int], str] = {cell: words for words, cell in POSITIONS.items()}

# Colour-shape pairs that never appear in training, as either object.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("orange", "circle"), ("green", "square"), ("white", "triangle")}
)


def caption_words() -> list[str]:
    """Every word any caption can use (the built-in model's tokenizer vocabulary)."""
    words = {"a", "and", "on", "background"}
    words.update(COLOURS, SHAPES, SIZES)
    for phrase in POSITIONS:
        words.update(phrase.split())
    return sorted(words)
