"""The processor: pure decisions (domain.py) and the Faust app that runs them (app.py)."""
