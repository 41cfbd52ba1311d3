"""The laboratory: tasks, data, configuration, training, evaluation, studies, pages and the
command line, built on the library (`poslab`), which never imports it."""
