"""Statistics: the accuracy model (`model`), answers per parameter (`effects`), learning curves (`curves`), looks and
rounds of a designed study (`settle`, `sequential`), and simulated studies with known truth (`simulate`)."""
