"""Model stage: the layer language (`layers`), shapes and cost (`shapes`), the Keras model (`build`)."""
