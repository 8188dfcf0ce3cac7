"""The `moeserve` command (`python -m serve_app.cli`); the parsers are in main.py."""
