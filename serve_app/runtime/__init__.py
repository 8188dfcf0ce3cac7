"""Assembles an engine from its parts: the experts and the shared prefix cache it is given."""
