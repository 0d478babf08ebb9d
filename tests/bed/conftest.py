"""Make the bed fixtures available to tests/bed (see fixtures.py)."""

from tests.bed.fixtures import appliance_image, appliance_iso, bed, bed_servers, domain_type  # noqa: F401
