"""Commands of this module are registered by zchat.cli."""

COMMANDS: list = []
