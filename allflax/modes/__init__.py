"""One module per `--mode` of main.py: train, evaluate, predict, export, compare, montecarlo.
They sit side by side and never import each other; what two share lives below them."""
