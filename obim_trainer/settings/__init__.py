"""Settings: the pydantic models behind the YAML files, the command's flags and ``OBIMConfig``."""
