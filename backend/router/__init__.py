"""Router rules: the validated rule model, conflicts between rules, and the versioned router bundle."""
