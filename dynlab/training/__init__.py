"""The bundled pico-decoder / pico-relora trainer; `dynlab.train(...)` runs it."""
