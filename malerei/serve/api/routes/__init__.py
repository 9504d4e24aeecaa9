"""One module per API family: native jobs, gallery, account, admin, system, and compatible APIs."""
