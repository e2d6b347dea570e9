"""Built-in tasks: small, exactly checkable problems a home-trained model can learn and be scored on."""
