"""Exports a .keras model as a TensorFlow SavedModel folder (runs in the TFLite tool environment).

python keras_to_saved_model.py IN.keras OUT_DIR
"""

import sys

import keras

keras.models.load_model(sys.argv[1], safe_mode=True).export(sys.argv[2], format="tf_saved_model", verbose=False)
print(f"exported {sys.argv[2]}")
