"""HTTP glue of the BentoML services: middleware, probes and error shaping.

Kept apart from ``riffusion/`` (a plain library without BentoML) and from
``service.py`` (the two services only).
"""
