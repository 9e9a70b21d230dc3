"""Shows what an example wrote to ``examples/results/``: its markdown tables and its figures."""
import os

import matplotlib.image
import matplotlib.pyplot as plt

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "results")


def table(name):
    """Print ``examples/results/<name>.md`` (the tables and notes the example wrote)."""
    with open(os.path.join(RESULTS, name + ".md"), encoding="utf-8") as f:
        print(f.read())


def figure(name, width=10):
    """Draw ``examples/results/<name>.png`` as a figure of this page."""
    img = matplotlib.image.imread(os.path.join(RESULTS, name + ".png"))
    height, w = img.shape[:2]
    fig, ax = plt.subplots(figsize=(width, width * height / w))
    ax.imshow(img)
    ax.set_axis_off()
    fig.subplots_adjust(0, 0, 1, 1)
