"""Trains a small Keras CNN (page orientation 0/90/180/270) and saves it as .keras. Runs in the
TFLite tool environment (it has TensorFlow); the test feeds it rendered, preprocessed pages.

    python train_keras.py DATA.npz OUT.keras [relu|elu]

elu puts an activation the Edge TPU cannot run into the graph (the npu refusal test).
"""

import sys

import keras
import numpy as np

data = np.load(sys.argv[1])
x, y = data["x"], data["y"]
act = sys.argv[3] if len(sys.argv) > 3 else "relu"
keras.utils.set_random_seed(0)
inp = keras.Input(shape=x.shape[1:], name="image")
h = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(inp)
h = keras.layers.Conv2D(32, 3, strides=2, activation=act)(h)
h = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(h)
h = keras.layers.Conv2D(64, 3, strides=2, activation="relu")(h)
h = keras.layers.GlobalAveragePooling2D()(h)
out = keras.layers.Dense(4, activation="softmax", name="orientation")(h)
model = keras.Model(inp, out)
model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
hist = model.fit(x, y, epochs=int(sys.argv[4]) if len(sys.argv) > 4 else 25, batch_size=32, verbose=0)
model.save(sys.argv[2])
print(f"trained: accuracy {hist.history['accuracy'][-1]:.3f}")
