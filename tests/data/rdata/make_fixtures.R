# Makes the R serialization fixtures that tests/test_data.py reads (run from this directory):
#   Rscript make_fixtures.R
# Written with R 4.2.2; the expected values in the tests are the literals below.
values <- list(
  chars = c("plain", NA, enc2utf8("caf\u00e9"), iconv("na\u00efve", "UTF-8", "latin1")),
  ints = c(1L, NA, -5L),
  seq = 1:10,                      # an ALTREP compact integer sequence
  defer = as.character(c(7L, NA, -12L)),  # an ALTREP deferred string (numbers not yet formatted)
  dbl = c(1.5, NA, NaN, Inf),
  lgl = c(TRUE, NA, FALSE),
  cplx = complex(real = 1, imaginary = -2),
  raw = as.raw(c(0, 255)),
  fac = factor(c("b", "a", "b")),
  df = data.frame(x = 1:2, y = c("u", "v")),
  nested = list(a = list(b = NULL)),
  sym = quote(x),
  pl = pairlist(a = 1, b = "z"),
  call = quote(f(x, y = 2))
)
e <- new.env()
assign("n", 42L, envir = e)
values$env <- e
values$env2 <- e                 # the same environment again: written as a reference
saveRDS(values, "values_v3.rds", version = 3, compress = FALSE)
saveRDS(values[c("chars", "ints", "dbl")], "values_v2.rds", version = 2, compress = TRUE)

db <- new.env()
assign("letters3", c("a", "b", "c"), envir = db)
assign("squares", (1:4)^2, envir = db)
tools:::makeLazyLoadDB(db, "db_zlib", compress = TRUE)
tools:::makeLazyLoadDB(db, "db_xz", compress = 3)
