"""Train stage: the recipe (`options`, `recipe`), the input pipeline (`pipeline`), callbacks, and `fit`."""
