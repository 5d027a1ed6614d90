// Renders /openapi.json with the Swagger UI files this worker serves itself (no CDN).
// "Authorize" takes an API key; it is kept for the session only.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  persistAuthorization: false,
  tryItOutEnabled: false,
  displayRequestDuration: true,
  defaultModelsExpandDepth: 0,
});
