"""Riffusion: text (and a seed spectrogram) to music via Stable Diffusion on mel spectrograms.

A plain library: no BentoML imports. Modules:

- ``spectrogram``: the checkpoint's spectrogram format, audio <-> mel amplitudes <-> image
- ``audio``: file I/O, resampling, loudness, slicing and crossfading
- ``seed_images``: the library of seed and mask images shipped in ``seed_images/``
- ``seed_image_synthesis``: makes that library (loops from ``loop_synth``)
- ``schemas``: typed generation jobs shared by the pipeline, CLI and service
- ``pipeline``: batched diffusion over heterogeneous jobs
- ``cli``: the ``riffusion`` command
"""

__version__ = "0.1.0"
