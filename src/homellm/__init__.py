"""homellm: build your own language model end to end, from raw text to a model you can talk to.

    homellm quickstart            # the built-in arithmetic task, trained and evaluated in minutes
"""

__version__ = "0.1.0"
